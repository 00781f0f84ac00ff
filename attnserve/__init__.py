"""The `attnserve` command (cli.py): the one place that puts the server's `serve` and the benchmarks' `bench`
side by side, so that server/ never imports clients/ (nor the other way round)."""
