"""``python -m audience_svc``: serve the AudienceService."""

from audience_svc.app import build_server
from audience_svc.settings import AudienceSettings
from carillon_chassis.entrypoint import run_service

if __name__ == "__main__":
    run_service(AudienceSettings, build_server, "Carillon audience_svc: entities, ingestion, audiences, working sets.")
