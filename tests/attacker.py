"""A process without the join secret that can reach a run's store on 127.0.0.1 (run by test_security).

    python tests/attacker.py race PORT      list the store's keys, find the process group's prefix,
                                            join gloo as rank 1 and follow gossiplab's protocol
                                            honestly, with a wrong secret (the eavesdropper)
    python tests/attacker.py abort PORT     write join/abort while the run is being admitted
    python tests/attacker.py inflate PORT   add a million to rank 1's ticket counter

Prints what it did as its last line; exits 0 whatever the run made of it.
"""

from __future__ import annotations

import datetime
import sys
import time

import torch.distributed as dist

from gossiplab.distributed import JoinRefused, prove_members

ATTEMPT = "gossiplab/attempt0/"
TIMEOUT = datetime.timedelta(seconds=60)


def store_client(port: int) -> dist.TCPStore:
    for _ in range(200):  # rank 0 opens the store
        try:
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT, wait_for_workers=False)
        except dist.DistError:
            time.sleep(0.05)
    sys.exit("rank 0 never opened its store")


def race(store: dist.TCPStore) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        groups = {key.split("/group-")[0] + "/group-" + key.split("/group-")[1].split("/")[0]
                  for key in store.list_keys() if "/group-" in key}  # fmt: skip
        if groups:
            break
        time.sleep(0.001)
    else:
        return "found no process group"
    dist.init_process_group("gloo", store=dist.PrefixStore(groups.pop(), store), rank=1, world_size=2, timeout=TIMEOUT)
    try:
        prove_members(dist.group.WORLD, 1, [0, 1], b"a guessed secret", "a guessed config digest", TIMEOUT)
    except JoinRefused as error:
        return f"joined gloo as rank 1, then refused: {error}"
    return "joined gloo as rank 1 and was accepted"


def main() -> None:
    mode, port = sys.argv[1], int(sys.argv[2])
    store = store_client(port)
    if mode == "race":
        print(race(store), flush=True)
        return
    if mode == "abort":  # before the rightful rank 1 has connected
        store.set(ATTEMPT + "join/abort", "forged: stop everything")
        print("wrote join/abort", flush=True)
    elif mode == "inflate":
        store.add(ATTEMPT + "join/tickets/1", 1_000_000)
        print("inflated rank 1's ticket counter", flush=True)


if __name__ == "__main__":
    main()
