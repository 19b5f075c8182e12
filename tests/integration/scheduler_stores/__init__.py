"""Integration tests of scheduler_svc's stores (campaigns, runs, lifecycle, schedules) on both backends."""
