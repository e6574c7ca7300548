"""The defuse experiment: `jfail.pipelines.defuse` (also `jfail defuse --config ...`)."""

from jfail.pipelines.defuse import main

if __name__ == "__main__":
    main()
