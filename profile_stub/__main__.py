"""``python -m profile_stub``: serve the ProfileService."""

from carillon_chassis.entrypoint import run_service
from profile_stub.app import build_server
from profile_stub.settings import ProfileSettings

if __name__ == "__main__":
    run_service(ProfileSettings, build_server, "Carillon profile_stub: profiles, consent and eligibility.")
