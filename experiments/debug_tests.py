"""The debug tests experiment: `jfail.pipelines.debug_tests` (also
`jfail debugtests --config ...`)."""

from jfail.pipelines.debug_tests import main

if __name__ == "__main__":
    main()
