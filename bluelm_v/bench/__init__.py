"""The benchmark job's parts (jobs/benchmark.py reads top to bottom with these):

    cases      the device inventory and the case grid -> (device, case) work items with stable ids
    store      results.jsonl: append one finished case at a time, read back what is done
    worker     the Ray actor driving one device's backend: load, warm-up, trials, stability
    scheduler  the fan-out: one case per device at a time, timeouts, actor restarts, one retry
    report     summary figures, report.md (a Table-5-like table per device) and PNG plots
"""
