"""``python -m scheduler_svc``: serve the CampaignService and run due campaigns."""

from carillon_chassis.entrypoint import run_service
from scheduler_svc.app import build_server
from scheduler_svc.settings import SchedulerSettings

if __name__ == "__main__":
    run_service(SchedulerSettings, build_server, "Carillon scheduler_svc: campaigns, schedules and runs.")
