"""profile_stub: the real-time profile, source of truth for consent and communication history.

Profiles with identities and a thin set of attributes, consent per channel, the communication
history of every send, and batch eligibility checks for delivery workers.
"""

SERVICE_NAME = "profile"
DOMAIN = "profile.carillon.dev"
