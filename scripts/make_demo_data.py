"""Generate the bundled demo dataset (deterministic: a fixed seed) into ``carillon_cli/data/``.

Three CSV files: ``customers.csv`` (the customer entity), ``bookings.csv`` (hotel bookings, a 1-N
child of customers) and ``profiles.csv`` (what the real-time profile knows: identities, first name
and email consent — some customers opted out, some never answered, a few have no email address).
"""

from __future__ import annotations

import csv
import random
from datetime import date, timedelta
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "carillon_cli" / "data"
FIRST = [
    "Astrid",
    "Björn",
    "Clara",
    "David",
    "Elin",
    "Felix",
    "Greta",
    "Hugo",
    "Ines",
    "Johan",
    "Karin",
    "Lars",
    "Maja",
    "Nils",
    "Olivia",
    "Per",
    "Rosa",
    "Sven",
    "Tove",
    "Ulf",
    "Vera",
    "Wilma",
    "Axel",
    "Ebba",
]
LAST = [
    "Andersson",
    "Berg",
    "Carlsson",
    "Dahl",
    "Ek",
    "Forsberg",
    "Gustafsson",
    "Holm",
    "Isaksson",
    "Johansson",
    "Karlsson",
    "Lind",
    "Martin",
    "Nilsson",
    "Olsen",
    "Persson",
]
COUNTRIES = ["SE", "SE", "SE", "NO", "DK", "FI", "FR", "US"]
TIERS = ["bronze"] * 4 + ["silver"] * 3 + ["gold"] * 2 + ["platinum"]
CITIES = ["Paris", "Miami", "Stockholm", "Oslo", "Rome", "Lisbon", "New York", "Copenhagen"]


def main() -> None:
    rng = random.Random(20261129)
    OUT.mkdir(parents=True, exist_ok=True)
    customers, bookings, profiles = [], [], []
    for n in range(1, 301):
        cid = f"c{n:04d}"
        first, last = rng.choice(FIRST), rng.choice(LAST)
        has_email = rng.random() > 0.03
        email = f"{first.lower().replace('ö', 'o')}.{last.lower()}.{n}@example.com" if has_email else ""
        signup = date(2023, 1, 1) + timedelta(days=rng.randrange(0, 1000))
        customers.append(
            {
                "customer_id": cid,
                "email": email,
                "first_name": first,
                "last_name": last,
                "loyalty_tier": rng.choice(TIERS),
                "country": rng.choice(COUNTRIES),
                "signup_date": signup.isoformat(),
                "version": 1,
            }
        )
        roll = rng.random()
        consent = "opted_out" if roll < 0.15 else "unknown" if roll < 0.20 else "opted_in"
        profiles.append(
            {"customer_id": cid, "email": email, "first_name": first, "last_name": last, "email_consent": consent}
        )
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            check_in = date(2026, 6, 1) + timedelta(days=rng.randrange(0, 365))
            bookings.append(
                {
                    "booking_id": f"b{len(bookings) + 1:05d}",
                    "customer_id": cid,
                    "hotel_city": rng.choice(CITIES),
                    "check_in": check_in.isoformat(),
                    "nights": rng.randint(1, 9),
                    "amount": f"{rng.randint(80, 900)}.{rng.randint(0, 99):02d}",
                    "version": 1,
                }
            )
    for name, rows in (("customers", customers), ("bookings", bookings), ("profiles", profiles)):
        with (OUT / f"{name}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
