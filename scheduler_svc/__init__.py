"""scheduler_svc: the control plane of Carillon.

Campaigns (a canvas: a DAG of activities and transitions, with a schedule), their lifecycle, and
their runs: a background runner claims due runs with leases and executes each activity in
topological order, calling audience_svc to build working sets and streaming them, batch by batch,
to the delivery worker of each channel, with a checkpoint for every acknowledged batch.
"""

SERVICE_NAME = "scheduler"
DOMAIN = "scheduler.carillon.dev"
