"""The papers' experiments as importable pipelines, each `main(argv)` reading a config file.

`experiments/<name>.py` and `jfail <method> --config ...` both call these.
"""
