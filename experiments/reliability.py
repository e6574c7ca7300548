"""The reliability measurements: `jfail.pipelines.reliability`."""

from jfail.pipelines.reliability import main

if __name__ == "__main__":
    main()
