"""Where the sites live: all in this process (simulation) or in blocks across processes (DESIGN section 7).

The runner trains, mixes and evaluates through a communicator (`gossiplab.communicator`), so one
algorithm code serves both the simulation (`SingleProcess`, every site in this process) and this:
- `ProcessGroup`: `torchrun --nproc-per-node K -m gossiplab run ...` (or any launcher that sets
  RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Process r owns the contiguous block r of the sites
  (`torch.tensor_split`, sizes differ by at most one) as its own [N_r, P] population, trained
  vectorized as in simulation. Every process derives the same topology and W from the shared seed;
  for a gossip round theta_i <- sum_j W_ij theta_j (i in its block) it needs only the rows j with
  W_ij != 0, so it receives exactly those (point-to-point) and sends each peer exactly the rows
  that peer needs. When every process needs every other process's whole block (a dense W), one
  all_gather moves the same bytes in fewer messages. The process then mixes its extended block
  (own rows and received rows, in global site order) with the run's merge operator, so a sparse
  round sums in the same order as the simulation.

Who may join: with a join secret (`distributed.secret_env` names an environment variable,
`distributed.secret_file` a file; the secret itself is never in the config), every process proves
it holds the secret before the first exchange (`admit`), and the group's own keys live under a store
prefix that only holders of the secret can derive. torch's store and gloo traffic are neither
encrypted nor authenticated: the secret keeps out processes that do not hold it, not an eavesdropper.

Faults: a process that dies is detected by its peers' failing sends/receives (or the group timeout);
process 0, which writes the run directory, compares heartbeat counters in the rendezvous store to
name the lost processes, and the survivors form a new group. The runner then rolls back to the last
checkpoint and drops the lost sites from W (rows renormalised), or stops (`distributed.on_failure`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gossiplab import sparse
from gossiplab.communicator import PeerLost
from gossiplab.config import Config, ConfigError, DistributedConfig, differing_fields, flatten
from gossiplab.devices import resolve_device
from gossiplab.merge import block_weights, rows_read

DEFAULT_SECRET_ENV = DistributedConfig.__dataclass_fields__["secret_env"].default
HEARTBEAT_S = 0.5  # how often each process bumps its heartbeat counter in the store
JOIN_POLL_S = 0.05  # how often a process waiting to join (or rank 0 waiting for claims) polls the store
MAX_CLAIMS = 16  # claims judged per rank: a store flooded with more cannot keep rank 0 checking them
TAG_BYTES = 32  # an HMAC-SHA256 tag on every payload of a secret-protected run


class ExchangeFailed(RuntimeError):
    """A send, receive or collective with the other processes failed or timed out."""


def exchange(method: Callable) -> Callable:
    """gloo reports a lost peer (connection reset, timeout) as a bare RuntimeError: name it. A
    payload that fails its authentication is no lost peer: it stops the run as it is."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except JoinRefused:
            raise
        except RuntimeError as error:
            raise ExchangeFailed(str(error)) from error

    return wrapped


class ResumeError(ValueError):
    """The processes' checkpoints do not share a step to resume from; nothing was changed."""


class JoinRefused(RuntimeError):
    """A process could not prove the run's join secret, or the run stopped because one could not."""


class Unauthenticated(JoinRefused):
    """A value or payload of a secret-protected run failed its authentication: someone without the
    join secret wrote it or altered it on the way. The run stops; nothing foreign is used."""


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors; on CUDA, NCCL for the CUDA tensors (the population's rows) and gloo
    for the CPU ones (losses, hits, the config check)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def everyone_needs_everything(needs: torch.Tensor, blocks: list[tuple[int, int]], members: list[int]) -> bool:
    """True when every process reads every row of every process (a dense W): then one all_gather."""
    return all(
        bool(needs[a:b, c:d].all()) for a, b in (blocks[r] for r in members) for c, d in (blocks[r] for r in members)
    )


def payload_rows(weights: torch.Tensor, blocks: list[tuple[int, int]], members: list[int]) -> list[int]:
    """Parameter rows each process sends in one gossip round with W = `weights`: to each peer, the
    rows of its own block that some site of the peer's block reads (W_ij != 0), each row once; for a
    dense W, its whole block (padded to the largest block) to every peer."""
    needs = weights != 0
    if everyone_needs_everything(needs, blocks, members):
        padded = max(b - a for a, b in (blocks[r] for r in members))
        return [padded * (len(members) - 1) for _ in members]
    rows = []
    for sender in members:
        lo, hi = blocks[sender]
        rows.append(sum(int(needs[slice(*blocks[peer]), lo:hi].any(0).sum()) for peer in members if peer != sender))
    return rows


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The key-value store at MASTER_ADDR:MASTER_PORT (hosted by rank 0, or by torchrun's agent),
    under a prefix per launch attempt: torchrun keeps its store across `--max-restarts`
    relaunches, and a relaunched group must not read the dead attempt's addresses."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0 and not agent_hosts, timeout=timeout)
    except dist.DistError as error:
        raise JoinRefused(
            f"cannot reach the run's rendezvous store at {address}:{port} within distributed.timeout_s = "
            f"{timeout.total_seconds():g} s ({str(error).splitlines()[0][:120]}): is rank 0 running there?"
        ) from error
    return dist.PrefixStore(f"gossiplab/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def join_secret(config: Config) -> bytes | None:
    """The run's join secret: the contents of `distributed.secret_file`, else the value of the
    environment variable `distributed.secret_env`; None when neither holds one. A variable named
    other than the default must be set: a typo must not run a multi-machine run without a secret."""
    settings = config.distributed
    if settings.secret_file:
        try:
            secret = Path(settings.secret_file).expanduser().read_bytes().strip()
        except OSError as error:
            raise ConfigError(
                f"field 'distributed.secret_file' = {settings.secret_file!r}: cannot read it ({error.strerror})"
            ) from error
        if not secret:
            raise ConfigError(f"field 'distributed.secret_file' = {settings.secret_file!r}: the file is empty")
        return secret
    if settings.secret_env not in os.environ and settings.secret_env != DEFAULT_SECRET_ENV:
        raise ConfigError(
            f"field 'distributed.secret_env' = {settings.secret_env!r}: no such environment variable is set in this "
            "process; set it to the join secret (or leave the field at its default for a run without one)"
        )
    return os.environ.get(settings.secret_env, "").encode() or None


def config_digest(config: Config) -> str:
    """SHA-256 of the resolved config: a proof of the secret is bound to the run it joins."""
    return hashlib.sha256(json.dumps(flatten(config.to_dict()), sort_keys=True).encode()).hexdigest()


def _proof(secret: bytes, *parts: object) -> str:
    """HMAC-SHA256 of the parts under the join secret."""
    return hmac.new(secret, "|".join(map(str, parts)).encode(), hashlib.sha256).hexdigest()


def on_one_machine() -> bool:
    """True when every process of this launch runs here: the store is on a loopback address and
    the launcher started all WORLD_SIZE processes on this machine (torchrun's LOCAL_WORLD_SIZE)."""
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        loopback = address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: another machine, as far as we can tell
        loopback = False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return loopback and int(os.environ.get("LOCAL_WORLD_SIZE", world)) >= world


def _key(secret: bytes, *parts: object) -> bytes:
    """A key derived from the join secret for one use (store values, payloads)."""
    return bytes.fromhex(_proof(secret, *parts))


class SignedValues:
    """Store values that steer a secret-protected run, each carrying HMAC-SHA256(key, name | value).

    torch's store answers anyone who can reach it: without a signature, one forged write could stop
    the run (`join/abort`), admit or refuse a process, or change a value rank 0 shares. With `key`
    None (a run without a secret, or a claimant without one) values travel as they are.
    """

    def __init__(self, store: dist.Store, key: bytes | None):
        self.store, self.key = store, key

    def _mac(self, name: str, value: str) -> str:
        return hmac.new(self.key or b"", f"{name}|{value}".encode(), hashlib.sha256).hexdigest()

    def set(self, name: str, value: str) -> None:
        self.store.set(name, f"{value}\n{self._mac(name, value)}" if self.key else value)

    def read(self, name: str) -> str | None:
        """The value under `name` (which must exist), or None when its signature does not hold."""
        raw = self.store.get(name).decode()
        if self.key is None:
            return raw.rpartition("\n")[0] if "\n" in raw else raw
        value, _, mac = raw.rpartition("\n")
        return value if hmac.compare_digest(mac, self._mac(name, value)) else None

    def get(self, name: str) -> str:
        """The value under `name`, waiting for it; Unauthenticated when its signature does not hold."""
        value = self.read(name)
        if value is None:
            raise Unauthenticated(
                f"the run's store holds a value under '{name}' that rank 0 did not write (its signature does not "
                "hold): a process without the join secret writes to this run's store; stopping"
            )
        return value


def _wait_for_any(values: SignedValues, keys: list[str], deadline: float) -> str | None:
    """The value of the first of `keys` set in the store with a signature that holds (polled), or
    None at the deadline. A forged value is ignored, with a warning, and the wait goes on."""
    warned: set[str] = set()
    try:
        while time.monotonic() < deadline:
            for key in keys:
                if values.store.check([key]):
                    value = values.read(key)
                    if value is not None:
                        return value
                    if key not in warned:
                        warned.add(key)
                        print(
                            f"warning: ignored '{key}' in the run's store: rank 0 did not write it (a process without "
                            "the join secret writes to the store)",
                            file=sys.stderr,
                            flush=True,
                        )
            time.sleep(JOIN_POLL_S)
    except dist.DistError:
        return "rank 0 stopped (its store closed)"
    return None


def _claims(store: dist.Store, ranks: set[int]) -> list[tuple[int, int]]:
    """(rank, ticket) of every claim rank 0 may judge: at most MAX_CLAIMS per rank."""
    return [(r, t) for r in sorted(ranks) for t in range(1, min(store.add(f"join/tickets/{r}", 0), MAX_CLAIMS) + 1)]


def _abort(values: SignedValues, refused: set[tuple[int, int]], ranks: set[int], reason: str) -> None:
    """Rank 0: tell every process the run will not start (signed), and give every claimant not
    already refused (admitted, or still waiting for its verdict) a moment to read why before this
    process, which hosts the store, exits."""
    store = values.store
    values.set("join/abort", reason)
    waiting = [c for c in _claims(store, ranks) if c not in refused]
    deadline = time.monotonic() + 10 * HEARTBEAT_S
    while time.monotonic() < deadline and not all(store.check([f"join/ack/{r}/{t}"]) for r, t in waiting):
        time.sleep(JOIN_POLL_S)


def _acknowledge(store: dist.Store, rank: int, ticket: int) -> None:
    """A claimant read that the run will not start (rank 0 may stop waiting for it)."""
    with contextlib.suppress(dist.DistError):
        store.set(f"join/ack/{rank}/{ticket}", "1")


def admit(
    store: dist.Store,
    rank: int,
    world_size: int,
    secret: bytes | None,
    digest: str,
    timeout: datetime.timedelta,
    on_failure: str,
) -> SignedValues:
    """Who may join the run; returns the store (with its signing key) under which the process
    group's own keys live.

    Rank 0 publishes whether the run needs the join secret and, if so, a fresh nonce with its own
    proof of the secret. Every other process draws a ticket t of its rank r and posts a claim {rank
    r, host, pid, config digest, proof = HMAC(secret, nonce | digest | r | t)}. Rank 0 admits the first
    valid claim for each rank and refuses every other one, naming it on its standard error; a
    refusal stops the run when `on_failure` is 'stop', and with 'drop' rank 0 keeps waiting (up to
    the timeout) for the rightful process. Rank 0's verdicts, the start and an abort are signed with
    a key derived from the secret and the nonce, so a forged one is ignored; at most MAX_CLAIMS
    tickets per rank are judged. The admitted processes then meet under the store prefix
    HMAC(secret, nonce | 'group'). That prefix is no secret (the store lists its keys to anyone), so
    the process group proves every member again over its own connections (`prove_members`).
    Without a secret nothing is checked.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        if secret is None:
            store.set("join/mode", "open")
            return SignedValues(store, None)
        nonce = secrets.token_hex(16)
        store.set("join/nonce", nonce)
        store.set("join/nonce-proof", _proof(secret, nonce, "rank 0"))
        store.set("join/mode", "secret")
        values = SignedValues(store, _key(secret, nonce, "join"))
        _admit_claims(values, set(range(1, world_size)), secret, nonce, digest, deadline, on_failure)
        values.set("join/go", "1")
        return _group_values(store, secret, nonce)
    try:
        return _join(store, rank, secret, digest, deadline)
    except dist.DistError as error:  # rank 0, which hosts the store, is gone
        raise JoinRefused(
            f"lost the run's store before joining: rank 0 stopped ({str(error).splitlines()[0][:80]})"
        ) from None


def _group_values(store: dist.Store, secret: bytes, nonce: str) -> SignedValues:
    return SignedValues(
        dist.PrefixStore(f"group-{_proof(secret, nonce, 'group')[:32]}", store), _key(secret, nonce, "group")
    )


def _join(store: dist.Store, rank: int, secret: bytes | None, digest: str, deadline: float) -> SignedValues:
    """A process other than rank 0: claim its rank (see `admit`), then wait for the start."""
    if store.get("join/mode").decode() == "open":
        if secret is not None:
            raise JoinRefused("this process holds a join secret but rank 0 runs without one: give all the same one")
        return SignedValues(store, None)
    nonce, rank0_proof = store.get("join/nonce").decode(), store.get("join/nonce-proof").decode()
    ticket = store.add(f"join/tickets/{rank}", 1)
    if ticket > MAX_CLAIMS:
        raise JoinRefused(
            f"the run's store has seen {ticket - 1} claims of rank {rank} already, and rank 0 judges at most "
            f"{MAX_CLAIMS}: someone floods this run's store; not claiming"
        )
    proof = _proof(secret, nonce, digest, rank, ticket) if secret is not None else ""
    claim = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "config": digest, "proof": proof}
    store.set(f"join/claim/{rank}/{ticket}", json.dumps(claim))  # rank 0 logs a refused claim: its operator sees it
    if secret is not None and not hmac.compare_digest(rank0_proof, _proof(secret, nonce, "rank 0")):
        raise JoinRefused(
            "rank 0's proof of the join secret does not hold with this process's secret: the two secrets differ "
            "(or the process serving as rank 0 is an impostor); not joining"
        )
    values = SignedValues(store, _key(secret, nonce, "join") if secret is not None else None)
    verdict = _wait_for_any(values, [f"join/verdict/{rank}/{ticket}", "join/abort"], deadline)
    if verdict != "admitted":
        _acknowledge(store, rank, ticket)
        hint = "" if secret is not None else " (this process has no join secret: see distributed.secret_env)"
        raise JoinRefused(f"rank 0 did not admit this process: {verdict or 'no answer in time'}{hint}")
    started = _wait_for_any(values, ["join/go", "join/abort"], deadline)
    if started != "1":
        _acknowledge(store, rank, ticket)
        raise JoinRefused(f"the run did not start: {started or 'no answer in time'}")
    return _group_values(store, secret, nonce) if secret is not None else SignedValues(store, None)


def _admit_claims(
    values: SignedValues, pending: set[int], secret: bytes, nonce: str, digest: str, deadline: float, on_failure: str
) -> None:
    """Rank 0: judge claims in ticket order until every rank in `pending` is admitted."""
    store, ranks = values.store, set(pending)
    judged: set[tuple[int, int]] = set()
    refused: set[tuple[int, int]] = set()
    while pending:
        posted = [c for c in _claims(store, pending) if c not in judged and store.check([f"join/claim/{c[0]}/{c[1]}"])]
        if not posted and time.monotonic() > deadline:
            flooded = [r for r in sorted(pending) if store.add(f"join/tickets/{r}", 0) > MAX_CLAIMS]
            flood = (
                f" (more than {MAX_CLAIMS} claims of rank(s) {flooded}: someone floods the store)" if flooded else ""
            )
            _abort(values, refused, ranks, f"rank 0 saw no valid claim for rank(s) {sorted(pending)} in time{flood}")
            raise JoinRefused(
                f"no process proved the join secret for rank(s) {sorted(pending)} in distributed.timeout_s{flood}"
            )
        if not posted:
            time.sleep(JOIN_POLL_S)
        for rank, ticket in posted:
            judged.add((rank, ticket))
            refusal = _judge_claim(
                store.get(f"join/claim/{rank}/{ticket}"), rank, ticket, pending, secret, nonce, digest
            )
            if refusal is None:
                pending.discard(rank)
                values.set(f"join/verdict/{rank}/{ticket}", "admitted")
                continue
            values.set(f"join/verdict/{rank}/{ticket}", f"refused: {refusal}")
            refused.add((rank, ticket))
            print(f"warning: refused {refusal}", file=sys.stderr, flush=True)
            if on_failure == "stop":
                _abort(values, refused, ranks, f"rank 0 refused {refusal}, and distributed.on_failure = 'stop'")
                raise JoinRefused(f"refused {refusal}; stopping (distributed.on_failure = 'stop')")


def _judge_claim(
    raw: bytes, rank: int, ticket: int, pending: set[int], secret: bytes, nonce: str, digest: str
) -> str | None:
    """None for a valid claim of a rank still missing, else why it is refused. The host and pid are
    what the claim says: unverified, and named as such."""
    try:
        claim = json.loads(raw)
        claimed = int(claim["rank"])
    except (ValueError, TypeError, KeyError):
        return f"a malformed claim of rank {rank} (ticket {ticket})"
    who = (
        f"a process claiming rank {rank} (it says: host {claim.get('host')!s:.64}, pid {claim.get('pid')!s:.16}; "
        "unverified)"
    )
    if claimed != rank or rank not in pending:
        return f"{who}: that rank is not expected (already joined, or out of range)"
    if claim.get("config") != digest:
        return f"{who}: it runs another config"
    if not hmac.compare_digest(str(claim.get("proof", "")), _proof(secret, nonce, digest, rank, ticket)):
        return f"{who}: it cannot prove the join secret"
    return None


def prove_members(
    group: Any, rank: int, members: list[int], secret: bytes, digest: str, timeout: datetime.timedelta
) -> bytes:
    """Every member of the process group proves the join secret over the group's own connections;
    returns the key that authenticates this group's payloads.

    The store's keys (the group's prefix included) are readable by anyone who can reach the store,
    so a process without the secret could take a rank's place in gloo's rendezvous. Each member
    draws a fresh 32-byte challenge; all are exchanged over the group (allgather), then each member
    r sends HMAC(secret, 'member' | r | config digest | every challenge), bound to its rank, the run's
    config and this group's challenges, which no earlier group can replay. A member whose proof does
    not hold stops every process that checks it.
    """
    deadline = time.monotonic() + timeout.total_seconds()

    def everyone(tensor: torch.Tensor) -> list[torch.Tensor]:
        received = [torch.empty_like(tensor) for _ in members]
        try:
            group.allgather([received], [tensor]).wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 1)))
        except RuntimeError as error:
            raise JoinRefused(
                f"the process group did not complete its membership proof within distributed.timeout_s "
                f"({str(error).splitlines()[0][:120]}): a member may not be running gossiplab with the join secret"
            ) from error
        return received

    challenges = b"".join(
        c.numpy().tobytes() for c in everyone(torch.frombuffer(bytearray(secrets.token_bytes(32)), dtype=torch.uint8))
    )

    def proof(member: int) -> bytes:
        return _key(secret, "member", member, digest, challenges.hex())

    mine = torch.frombuffer(bytearray(proof(rank)), dtype=torch.uint8)
    failed = [
        m
        for m, theirs in zip(members, everyone(mine), strict=True)
        if not hmac.compare_digest(theirs.numpy().tobytes(), proof(m))
    ]
    if failed:
        raise JoinRefused(
            f"rank(s) {failed} of the process group cannot prove the join secret over their connection: a process "
            "without it took their place (torch's store lists its keys to anyone who can reach it); stopping before "
            "any exchange of parameters"
        )
    return _key(secret, "payload", digest, challenges.hex())


class ProcessGroup:
    """This process's block of sites in a gloo process group, with failure detection and regrouping."""

    writes: bool

    def __init__(self, config: Config):
        timeout = datetime.timedelta(seconds=config.distributed.timeout_s)
        self.timeout = timeout
        self.on_failure = config.distributed.on_failure
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.writes = self.rank == 0
        secret = join_secret(config)
        if secret is None and self.rank == 0 and not on_one_machine():
            print(
                "warning: no join secret (distributed.secret_env / secret_file): anyone who can reach "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} can join this run or send "
                "it tensors; run it only on a trusted network",
                file=sys.stderr,
                flush=True,
            )
        store = rendezvous_store(self.rank, self.world_size, timeout)
        self._secret, self._digest = secret, config_digest(config)
        self.values = admit(store, self.rank, self.world_size, secret, self._digest, timeout, self.on_failure)
        self.store = self.values.store
        try:
            dist.init_process_group(
                backend_for(resolve_device(config.train.device)),  # 'auto' too
                store=self.store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
            )
        except RuntimeError as error:  # torch.distributed.DistError and gloo connection failures
            raise JoinRefused(
                f"not every process of the run joined within distributed.timeout_s = {timeout.total_seconds():g} s "
                f"({str(error).splitlines()[0][:120]})"
            ) from error
        self.group = dist.group.WORLD
        self.members = list(range(self.world_size))  # original ranks still in the run
        self.epoch = 0  # regroupings so far
        self._exchanges = 0  # exchanges in this group so far: each payload's tag names its exchange
        self._stopped, self._heart = threading.Event(), None
        payload_key = self._prove_members()  # the membership proof runs whenever there is a secret
        self._payload_key = payload_key if config.distributed.authenticate_payloads else None
        self.num_sites = config.num_sites
        blocks = torch.tensor_split(torch.arange(config.num_sites), self.world_size)
        self.blocks = [(int(b[0]), int(b[-1]) + 1) for b in blocks]
        self.owner = torch.cat([torch.full((len(b),), r) for r, b in enumerate(blocks)])
        self.sites = slice(*self.blocks[self.rank])
        self._beats = 0
        self._shared = 0  # values shared by rank 0 so far
        self.bytes_sent = 0  # parameter payload this process sent to others
        self.failures = (ExchangeFailed,)
        self._averagers: dict[int, tuple[torch.Tensor, Callable]] = {}
        self._beat()
        self._heart = threading.Thread(target=self._heartbeat, daemon=True)
        self._heart.start()
        try:
            self._check_same_config(config)
        except (ConfigError, JoinRefused):  # a config that differs, or one written by someone else
            self.close(together=False)
            raise

    # --- setup -------------------------------------------------------------------------------

    def _prove_members(self) -> bytes | None:
        """With a join secret, every member of the current group proves it (`prove_members`);
        returns the key of this group's payload tags."""
        if self._secret is None:
            return None
        try:
            return prove_members(self.group, self.rank, self.members, self._secret, self._digest, self.timeout)
        except JoinRefused:
            self.close(together=False)
            raise

    def _beat(self) -> None:
        self._beats += 1
        self.values.set(f"gossiplab/beat/{self.rank}", str(self._beats))

    def _heartbeat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # the store's host is gone: the main thread will find out and stop
                return

    def _check_same_config(self, config: Config) -> None:
        """Every process must run the same config: refuse to start, naming the fields that differ."""
        mine = flatten(config.to_dict())
        self.values.set(f"gossiplab/config/{self.rank}", json.dumps(mine, sort_keys=True))
        for other in range(self.world_size):
            theirs = json.loads(self.values.get(f"gossiplab/config/{other}"))
            differing = differing_fields(mine, theirs)
            if differing:
                details = ", ".join(
                    f"'{k}' ({mine.get(k)!r} here, {theirs.get(k)!r} on rank {other})" for k in differing
                )
                raise ConfigError(f"rank {self.rank} and rank {other} run different configs: fields {details}")

    @exchange
    def share(self, key: str, value: str) -> str:
        """Rank 0's `value`, seen by every process (every process calls this in the same order)."""
        self._shared += 1
        key = f"gossiplab/share/{self._shared}/{key}"
        if self.rank == 0:
            self.values.set(key, value)
            return value
        return self.values.get(key)

    def close(self, together: bool = True) -> None:
        """Stop the heartbeat and leave the group; `together` (a finished run) waits for every
        process first, since rank 0 hosts the store the others still use."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._heart is not None:
            self._heart.join()
        if together:
            with contextlib.suppress(RuntimeError):  # a peer already gone: nothing left to wait for
                self.sum(torch.zeros(1))
        dist.destroy_process_group()
        if together:  # rank 0 keeps the store up until every process has left its group: a worker
            # of `bench --distributed` once died at exit ("terminate called without an active
            # exception") after rank 0, the store's host, had gone
            with contextlib.suppress(RuntimeError):
                self.store.set(f"gossiplab/left/{self.rank}", "1")
                if self.rank == 0:
                    self.store.wait([f"gossiplab/left/{r}" for r in self.members], self.timeout)

    # --- communication -----------------------------------------------------------------------

    def _index(self, rank: int) -> int:
        """The position of an original rank in the current group."""
        return self.members.index(rank)

    def _tag(self, payload: torch.Tensor, sender: int, receiver: object) -> torch.Tensor:
        """HMAC-SHA256 of a payload under this group's key, bound to the exchange, the group's epoch,
        the sender and the receiver ('all' for a collective), so no payload can be replayed or
        redirected; 32 bytes as a uint8 tensor."""
        assert self._payload_key is not None
        mac = hmac.new(self._payload_key, f"{self._exchanges}|{self.epoch}|{sender}|{receiver}|".encode(), "sha256")
        mac.update(memoryview(payload.detach().cpu().contiguous().numpy()).cast("B"))
        return torch.frombuffer(bytearray(mac.digest()), dtype=torch.uint8)

    def _check_tag(self, payload: torch.Tensor, tag: torch.Tensor, sender: int, receiver: object) -> None:
        if not hmac.compare_digest(tag.numpy().tobytes(), self._tag(payload, sender, receiver).numpy().tobytes()):
            raise Unauthenticated(
                f"a payload from rank {sender} failed its authentication (exchange {self._exchanges}): it was altered "
                "on the way or sent by a process without the join secret; stopping. Checkpoints written so far "
                "are intact."
            )

    def _allgather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's `tensor` (one shape everywhere), in member order; with payload
        authentication each arrives with its tag checked."""
        received = [torch.empty_like(tensor) for _ in self.members]
        self._wait([self.group.allgather([received], [tensor])])
        if self._payload_key is not None:
            tag = self._tag(tensor, self.rank, "all")
            tags = [torch.empty_like(tag) for _ in self.members]
            self._wait([self.group.allgather([tags], [tag])])
            for member, part, their_tag in zip(self.members, received, tags, strict=True):
                self._check_tag(part, their_tag, member, "all")
        return received

    @exchange
    def mix(self, theta: torch.Tensor, weights: torch.Tensor, operator: Callable) -> int:
        """theta_i <- sum_j W_ij theta_j for this block's sites; returns the bytes this process sent.
        `operator.resized` (the run's GossipAverager) mixes the extended block, one per block size."""
        self._exchanges += 1
        lo, hi = self.sites.start, self.sites.stop
        weights = sparse.dense(weights)  # each process reads its block of rows; N is at most thousands here
        needs = weights != 0  # [i, j]: site i reads site j
        peers = [r for r in self.members if r != self.rank]
        dense = everyone_needs_everything(needs, self.blocks, self.members)
        if dense:
            extended_sites = torch.cat([torch.arange(*self.blocks[r]) for r in self.members])
        else:
            extended_sites = rows_read(weights, self.sites)
        if len(extended_sites) not in self._averagers:  # buffers and mixer per extended-block size, reused
            shape = torch.Size((len(extended_sites), theta.shape[1]))
            self._averagers[len(extended_sites)] = (torch.empty(shape, device=theta.device), operator.resized(shape))
        extended, averager = self._averagers[len(extended_sites)]
        position = {int(s): k for k, s in enumerate(extended_sites)}
        own = slice(position[lo], position[lo] + (hi - lo))
        extended[own] = theta
        sent = 0
        if dense:
            send = torch.zeros(self._padded(), theta.shape[1], device=theta.device)
            send[: hi - lo] = theta
            received = self._allgather(send)
            for r, rows in zip(self.members, received, strict=True):
                a, b = self.blocks[r]
                extended[position[a] : position[a] + b - a] = rows[: b - a]
            sent = send.numel() * 4 * len(peers)
        else:
            works, tagged = [], []
            for peer in peers:
                a, b = self.blocks[peer]
                rows_to_send = torch.nonzero(needs[a:b, lo:hi].any(0)).flatten() + lo
                if len(rows_to_send):
                    payload = theta[rows_to_send - lo].contiguous()
                    works.append(self.group.send([payload], self._index(peer), 0))
                    if self._payload_key is not None:
                        works.append(self.group.send([self._tag(payload, self.rank, peer)], self._index(peer), 1))
                    sent += payload.numel() * 4
                rows_to_receive = [s for s in range(a, b) if s in position]
                if rows_to_receive:
                    first = position[rows_to_receive[0]]
                    rows = extended[first : first + len(rows_to_receive)]
                    works.append(self.group.recv([rows], self._index(peer), 0))
                    if self._payload_key is not None:
                        tag = torch.empty(TAG_BYTES, dtype=torch.uint8)
                        works.append(self.group.recv([tag], self._index(peer), 1))
                        tagged.append((rows, tag, peer))
            self._wait(works)
            for rows, tag, peer in tagged:
                self._check_tag(rows, tag, peer, self.rank)
        averager(extended, block_weights(weights, extended_sites, own))  # received rows are inputs only
        theta.copy_(extended[own])
        self.bytes_sent += sent
        return sent

    def _wait(self, works: list) -> None:
        for work in works:
            work.wait(self.timeout)

    def _padded(self) -> int:
        return max(b - a for a, b in (self.blocks[r] for r in self.members))

    @exchange
    def gather(self, rows: torch.Tensor, payload: bool = False) -> torch.Tensor:
        """Per-site rows [N_r, ...] of every process in site order [N, ...]; lost processes' rows are
        zero. `payload`: gossip messages, whose bytes (this block to every other process) count in
        `bytes_sent`."""
        self._exchanges += 1
        size = self._padded()
        send = torch.zeros(size, *rows.shape[1:], dtype=rows.dtype)
        send[: len(rows)] = rows
        received = self._allgather(send)
        if payload:
            self.bytes_sent += send.numel() * send.element_size() * (len(self.members) - 1)
        full = torch.zeros(self.num_sites, *rows.shape[1:], dtype=rows.dtype)
        for r, part in zip(self.members, received, strict=True):
            a, b = self.blocks[r]
            full[a:b] = part[: b - a]
        return full

    @exchange
    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes, added in rank order (the same bits whatever gloo's reduction
        algorithm; with payload authentication every process's term is checked)."""
        self._exchanges += 1
        parts = self._allgather(value.clone())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    # --- checkpoints -------------------------------------------------------------------------

    def own_folder(self, run_dir: Path) -> Path | None:
        """This process's own files (checkpoints, a config copy): under run_dir/rank<r>/."""
        folder = run_dir / f"rank{self.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def agree_on_step(self, steps: list[int]) -> int:
        """The step every process can resume from: the oldest newest checkpoint (a process killed
        between two processes' checkpoint writes leaves them one checkpoint apart; each keeps its
        previous one). `steps` are this process's [newest, previous] checkpoint steps (-1: none)."""
        held = self.gather(torch.tensor([steps]))[torch.tensor([self.blocks[r][0] for r in self.members])]
        agreed = int(held[:, 0].min())
        missing = [r for r, pair in zip(self.members, held.tolist(), strict=True) if agreed not in pair]
        if missing:
            raise ResumeError(
                f"cannot resume: rank(s) {missing} hold no checkpoint of step {agreed}, the newest one every "
                f"process has (checkpoints per rank: {dict(zip(self.members, held.tolist(), strict=True))}); "
                "a run that dropped a process cannot be resumed"
            )
        return agreed

    # --- faults ------------------------------------------------------------------------------

    def recover(self, error: Exception) -> PeerLost:
        """After a failed exchange: agree with the other survivors on who is left and form a new
        group of them. Returns what was lost; raises PeerLost when the run must stop instead."""
        self.epoch += 1
        prefix = f"gossiplab/regroup/{self.epoch}"
        deadline = self.timeout + datetime.timedelta(seconds=10 * HEARTBEAT_S)
        try:
            self.values.set(f"{prefix}/joined/{self.rank}", "1")
            if self.rank == 0:
                before = {r: self.values.read(f"gossiplab/beat/{r}") for r in self.members}
                time.sleep(4 * HEARTBEAT_S)
                # alive: joined the regrouping already (its heartbeat may wait behind that store
                # call), or still beating (it will join once its own exchange fails or times out)
                alive = [
                    r
                    for r in self.members
                    if self._joined(f"{prefix}/joined/{r}")
                    or self.values.read(f"gossiplab/beat/{r}") not in (before[r], None)
                ]
                self.store.wait([f"{prefix}/joined/{r}" for r in alive], deadline)
                self.values.set(f"{prefix}/members", json.dumps(alive))
            else:
                self.store.wait([f"{prefix}/members"], deadline)
                alive = json.loads(self.values.get(f"{prefix}/members"))
        except Unauthenticated:
            raise
        except Exception as store_error:  # the store lives with rank 0 (or the launcher): it is gone
            raise PeerLost(
                f"lost contact with rank 0, which writes the run directory ({store_error}); stopping. "
                "Checkpoints written so far are intact.",
                [],
            ) from error
        if self.rank not in alive:
            raise PeerLost("rank 0 saw no heartbeat from this process and dropped it; stopping", []) from error
        lost = [r for r in self.members if r not in alive]
        lost_sites = [s for r in lost for s in range(*self.blocks[r])]
        message = f"lost rank(s) {lost} holding sites {lost_sites} ({str(error).splitlines()[0][:160]})"
        if 0 in lost or self.on_failure == "stop" or not lost:
            raise PeerLost(f"{message}; stopping. Checkpoints written so far are intact.", lost_sites) from error
        self.members = alive
        store = dist.PrefixStore(f"{prefix}/group", self.store)
        self.group = dist.ProcessGroupGloo(store, alive.index(self.rank), len(alive), self.timeout)
        self._exchanges = 0
        key = self._prove_members()  # the new group's rendezvous went through the store too
        self._payload_key = key if self._payload_key is not None else None
        return PeerLost(message, lost_sites)

    def _joined(self, key: str) -> bool:
        """A survivor's signed 'joined' mark of a regrouping is in the store."""
        return self.store.check([key]) and self.values.read(key) is not None
