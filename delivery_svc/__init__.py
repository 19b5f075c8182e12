"""delivery_svc: the delivery worker of one channel.

Per batch of recipients it asks the profile service for eligibility, renders the template in a Jinja2
sandbox, writes the send ledger (one row per run, activity, profile and entity: the guarantee against
lost and duplicate sends), sends through the channel provider, records the communications and only
then acknowledges the batch. Only the email channel is implemented so far.
"""

SERVICE_NAME = "delivery"
DOMAIN = "delivery.carillon.dev"
