"""The prime experiment: `jfail.pipelines.prime` (also `jfail prime --config ...`)."""

from jfail.pipelines.prime import main

if __name__ == "__main__":
    main()
