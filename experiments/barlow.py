"""The barlow experiment: `jfail.pipelines.barlow` (also `jfail barlow --config ...`)."""

from jfail.pipelines.barlow import main

if __name__ == "__main__":
    main()
