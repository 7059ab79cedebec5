"""`make bench`: regfs against its peers (docker-registry, the page cache, openssl), same run.

A tool, not a test: it prints figures, ratios and targets, and writes them as JSON to
bench/results/. See `python -m bench --help` and bench/scenarios.py for what each measure does.
"""
