"""Write a socksflow configuration with every costly feature on, for ``bench/run.py``.

The ACL with 100 000 blocked domains and 10 000 blocked networks (as bench/acl_decision.py
makes them), the JSON access log to a file, and session-rate, concurrency and bandwidth limits
set high enough never to refuse the benchmark's load, so what is measured is their cost::

    python bench/features.py                      # writes bench/build/features/rules.yaml
    python bench/run.py --servers socksflow --socksflow-config bench/build/features/rules.yaml
"""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

from acl_decision import write_lists

FOLDER = Path(__file__).resolve().parent / "build" / "features"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")

RULES = """\
listen: [127.0.0.1:1080]
auth: {methods: [none]}
rules:
  - deny: {to: file:domains.txt}
    reason: domain blocklist
  - deny: {to: file:networks.txt}
    reason: network blocklist
  - allow: {from: 127.0.0.0/8}
limits:
  - match: {from: 127.0.0.0/8}
    sessions_per_second: 1000000
    max_sessions: 100000
    bandwidth: 100GiB/s
log:
  access: {format: json, file: access.log}
"""


def main() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    write_lists(FOLDER, 100_000, 10_000, random.Random(1928))
    networks = FOLDER / "networks.txt"  # the benchmark's targets are on loopback: keep it reachable
    kept = [line for line in networks.read_text().split() if not ipaddress.ip_network(line).overlaps(LOOPBACK)]
    networks.write_text("\n".join(kept) + "\n")
    (FOLDER / "rules.yaml").write_text(RULES)
    print(FOLDER / "rules.yaml")


if __name__ == "__main__":
    main()
