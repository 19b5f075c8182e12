"""scheduler_svc: the control plane of Carillon.

Campaigns (a canvas: a DAG of targeting, channel and flow activities joined by transitions from named
outputs, with a schedule and variables), their lifecycle (:mod:`~scheduler_svc.lifecycle`), their
schedules (once, daily, every N minutes, weekly, monthly, or signals; :mod:`~scheduler_svc.schedules`)
and their runs: a background runner creates the run of each due launch time, claims due runs with
leases and executes each activity once its inputs are resolved, calling audience_svc to build working
sets and streaming them, batch by batch, to the delivery worker of each channel, with a checkpoint for
every acknowledged batch. Waits are durable timers; every run keeps a log that WatchRun follows.
"""

SERVICE_NAME = "scheduler"
DOMAIN = "scheduler.carillon.dev"
