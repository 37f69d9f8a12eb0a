"""Money adds up under faults: API + flush + webhooks together while Redis, Postgres, Stripe and the flush
itself fail, then every customer's tokens must agree across clients, Postgres and Stripe.

Short form by default (~35 s, part of `make test`); `CHAOS_FULL=1` (`make chaos`) runs longer phases, more
clients and customers, and every fault twice. Run with -s to see the tables.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.harness import (
    FlushLoop,
    Ledger,
    Load,
    Phases,
    WebhookDriver,
    World,
    count,
    crash_points,
    crashing_flushes,
    fault_table,
    flagged_unrecorded,
    per_customer_table,
    phase_table,
    quiet_logs,
    redis_backlog,
    request_id_diff,
    settle,
    two_flushes_at_once,
    unsent_reports,
    world,
)
from tests.support.webhooks import invoice_paid_event, subscription_event

FULL = os.environ.get("CHAOS_FULL") == "1"


@dataclass(frozen=True)
class Config:
    customers: int
    workers: int
    phase: float  # seconds each phase lasts
    down: float  # seconds a killed server stays down
    cycles: int  # how many times the whole fault list runs
    stream_share: float = 0.25
    flush_interval: float = 0.5


CONFIG = (Config(customers=8, workers=32, phase=8.0, down=5.0, cycles=2) if FULL
          else Config(customers=4, workers=12, phase=2.0, down=1.5, cycles=1))


class Script:
    """The fault phases, each a function that injects its fault and lasts about `CONFIG.phase` seconds."""

    def __init__(self, w: World, flush: FlushLoop, hooks: WebhookDriver, cfg: Config) -> None:
        self.w, self.flush, self.hooks, self.cfg = w, flush, hooks, cfg
        self.faults: list[tuple[str, str, str]] = []
        self.created = int(time.time()) + 10  # webhook event times, increasing
        self.churned = False

    def note(self, phase: str, fault: str, observed: str) -> None:
        self.faults.append((phase, fault, observed))

    def webhook_traffic(self, phase: str) -> None:
        """Each phase also gets subscription updates, a duplicate, a stale event and an invoice.paid."""
        live = [c for c in self.w.customers if not c.churned]
        c = live[len(self.faults) % len(live)]
        self.created += 5
        update = subscription_event("customer.subscription.updated", c.subscription_id, c.customer_id, "active",
                                    self.created)
        stale = subscription_event("customer.subscription.updated", c.subscription_id, c.customer_id, "past_due",
                                   self.created - 3)
        self.hooks.send(update, update, stale, invoice_paid_event(c.customer_id, c.subscription_id, self.created))

    def churn(self, phase: str) -> None:
        """The last customer cancels: its keys must get 402 from then on, and its usage so far is still billed."""
        c = self.w.customers[-1]
        self.created += 5
        c.churned = True
        self.hooks.send(subscription_event("customer.subscription.deleted", c.subscription_id, c.customer_id,
                                           "canceled", self.created))
        self.note(phase, "subscription deleted", f"{c.customer_id}: its keys get 402 from now on")

    def hold(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    # --- phases ---------------------------------------------------------------------------------------

    def baseline(self, phase: str) -> None:
        self.hold(self.cfg.phase)

    def redis_kill(self, phase: str) -> None:
        self.w.redis.kill()
        self.hold(self.cfg.down)
        self.w.redis.start()
        self.note(phase, "redis kill -9, restart", f"down {self.cfg.down:.1f}s, AOF reloaded")
        self.hold(self.cfg.phase - self.cfg.down)

    def pg_restart(self, phase: str) -> None:
        started = time.monotonic()
        self.w.pg.restart()
        self.note(phase, "postgres restart -m fast", f"took {time.monotonic() - started:.1f}s")
        self.hold(self.cfg.phase - (time.monotonic() - started))

    def pg_down(self, phase: str) -> None:
        self.w.pg.stop("immediate")
        self.hold(self.cfg.down)
        self.w.pg.start()
        self.note(phase, "postgres crash (stop -m immediate), start", f"down {self.cfg.down:.1f}s")
        self.hold(self.cfg.phase - self.cfg.down)

    def both_down(self, phase: str) -> None:
        self.w.redis.kill()
        self.w.pg.stop("immediate")
        self.hold(self.cfg.down)
        self.w.pg.start()
        self.w.redis.start()
        self.note(phase, "redis and postgres down together", f"down {self.cfg.down:.1f}s")
        self.hold(self.cfg.phase - self.cfg.down)

    def stripe(self, kind: str, n: int) -> Callable[[str], None]:
        def step(phase: str) -> None:
            before = self.w.fake.pending_faults
            self.w.fake.inject(kind, count=n)
            self.hold(self.cfg.phase)
            left = self.w.fake.pending_faults
            self.note(phase, f"stripe {kind} x{n}", f"{before + n - left} answered with the fault in the phase")
        return step

    def two_flushes(self, phase: str) -> None:
        locked: list[str] = []
        unlocked: list[str] = []
        deadline = time.monotonic() + self.cfg.phase
        while time.monotonic() < deadline:
            locked += two_flushes_at_once(self.w.settings, use_lock=True)
            unlocked += two_flushes_at_once(self.w.settings, use_lock=False)
            self.hold(0.2)
        self.note(phase, "two flushes at once (advisory lock)",
                  f"{len(locked) // 2} pairs; {locked.count('skipped')} runs found the lock held")
        self.note(phase, "two flushes at once (no lock)",
                  f"{len(unlocked) // 2} pairs; {unlocked.count('ran')} runs completed side by side")

    def flush_crash(self, phase: str) -> None:
        started = time.monotonic()
        self.flush.pause()  # the crashing flushes must get the lock and real work
        try:
            points = crash_points()
            plans: list[tuple[str | None, float]] = [(p, 0.0) for p in points] or \
                [(None, d) for d in (0.05, 0.15, 0.3, 0.6)]
            for (point, delay), outcome in zip(plans, crashing_flushes(self.w.settings, plans), strict=True):
                how = f"AIKIT_CRASH_AT={point}" if point else f"SIGKILL after {delay:.2f}s"
                self.note(phase, f"flush dies mid-way ({how})", outcome)
        finally:
            self.flush.resume()
        self.hold(self.cfg.phase - (time.monotonic() - started))

    def plan(self) -> list[tuple[str, Callable[[str], None]]]:
        return [
            ("redis-kill", self.redis_kill),
            ("pg-restart", self.pg_restart),
            ("stripe-500", self.stripe("500", 6)),
            ("pg-down", self.pg_down),
            ("stripe-429", self.stripe("429", 6)),
            ("both-down", self.both_down),
            ("stripe-timeout", self.stripe("timeout", 3)),
            ("stripe-lost-answer", self.stripe("accept_then_drop", 4)),
            ("stripe-500-after-accept", self.stripe("accept_then_500", 4)),
            ("two-flushes", self.two_flushes),
            ("flush-crash", self.flush_crash),
        ]


@pytest.mark.timeout(1800 if FULL else 300)
def test_tokens_agree_everywhere_after_faults(tmp_path: Path) -> None:
    cfg = CONFIG
    phases, ledger = Phases(), Ledger()
    started = time.monotonic()
    log_path = str(tmp_path / "app.log")
    with quiet_logs(log_path), world(cfg.customers) as w:
        flush = FlushLoop(w.settings, cfg.flush_interval)
        hooks = WebhookDriver(w.base)
        script = Script(w, flush, hooks, cfg)
        phases.begin("baseline")
        load = Load(w.base, w.customers, phases, ledger, workers=cfg.workers, stream_share=cfg.stream_share,
                    seed=7)
        flush.start()
        hooks.start()
        load.start()
        try:
            script.baseline("baseline")
            for cycle in range(cfg.cycles):
                for i, (name, step) in enumerate(script.plan()):
                    label = f"{name}" if cfg.cycles == 1 else f"{name}#{cycle + 1}"
                    phases.begin(label)
                    script.webhook_traffic(label)
                    if cycle == 0 and i == len(script.plan()) // 2:
                        script.churn(label)
                    step(label)
            phases.begin("recovery")
            script.baseline("recovery")
        finally:
            load.stop()
            phases.end()
            hooks.stopping.set()
            hooks.join(timeout=60)
            flush.stopping.set()
            flush.join(timeout=60)
        settled = settle(w.settings)
        missing, stored_unanswered = request_id_diff(w.settings, ledger)
        flagged = flagged_unrecorded(log_path)
        uncertain = [r for r in stored_unanswered if r in flagged]
        extra = [r for r in stored_unanswered if r not in flagged]
        totals = count(w.settings, ledger, w.fake, uncertain)
        backlog = redis_backlog(w.settings)
        unsent = unsent_reports(w.settings)
        leftover_faults = w.fake.pending_faults
        stripe_calls = sum(w.fake.calls.values())
    elapsed = time.monotonic() - started

    ok = sum(p.ok for p in phases.all)
    print(f"\n=== chaos ({'full' if FULL else 'short'}): {len(w.customers)} customers, {cfg.workers} clients, "
          f"{elapsed:.0f}s, {ok} answered requests, {sum(totals.clients.values())} tokens ===")
    print(fault_table(script.faults))
    print(phase_table(phases.all))
    print(per_customer_table(totals))
    print(f"flush runs: {dict(flush.runs)}; settle rounds: {len(settled)}; webhooks: {dict(hooks.outcomes)} "
          f"(+{hooks.retries} redeliveries); usage reads: {dict(load.usage_reads)}; stripe calls: {stripe_calls}; "
          f"faults left unused: {leftover_faults}; streams broken after usage: {ledger.broken_after_usage}; "
          f"billed although answered 503 (commit outcome unknown): {len(uncertain)}")

    if uncertain:
        print(f"uncertain: {len(uncertain)} requests ({sum(totals.uncertain.values())} tokens) were billed although "
              f"the client got a 503: the store failed as it committed (Redis or Postgres died that instant); "
              f"the app logged each as usage_unrecorded: {uncertain[:3]}")
    if missing or extra:
        print(f"answered, not stored: {dict(ledger.describe(missing))}; stored, never answered: {len(extra)} "
              f"e.g. {extra[:3]}")
    if backlog[1]:
        print(f"pending counters left: {backlog[1]}")
    assert not hooks.rejected, hooks.rejected
    assert hooks.pending() == 0
    assert backlog == (0, {}), f"Redis still holds usage after the final flush: {backlog}"
    assert not unsent, f"meter reports not sent: {dict(unsent)}"
    assert not missing, f"{len(missing)} answered requests not stored, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} stored requests no client was told about, e.g. {extra[:5]}"
    # A store that fails as it commits may have committed: the app answers 503 and logs the event. Those few
    # are the only requests billed without an answer, and only in a phase where a store was killed.
    assert len(uncertain) <= 5, uncertain
    assert not totals.differences(), "\n".join(totals.differences())
    assert ok > 0 and all(totals.clients.get(c.customer_id, 0) > 0 for c in w.customers)
    # An outage is a 503 with Retry-After (the client may retry), never a 500.
    five_hundreds = sum(p.codes.get("500", 0) for p in phases.all) + load.usage_reads.get("500", 0)
    assert five_hundreds == 0, f"{five_hundreds} answers were 500 (see app.log in {tmp_path})"
    churned = phases.all[len(phases.all) // 2:]
    assert any(p.codes.get("402") for p in churned), "the churned customer's keys were never refused"
