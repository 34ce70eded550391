"""Reading each customer for stage sync: Partner Center's subscriptions of the customer and its
tenant's directory, in this process's threads or, for a large sync, in worker processes.

A customer costs four HTTPS requests (its Partner Center subscriptions, its tenant's OpenID
configuration and a token, one JSON batch of the directory reads), and in Python most of their
cost is CPU (requests, urllib3, TLS, msal), held to one core by the GIL: about 5 ms of CPU a
customer on the machine of docs/benchmarks.md. With more than ``POOL_MIN_CUSTOMERS`` customers
the reads go to worker processes (``[sync] processes``, default one per CPU up to 4), a page of
customers at a time; ``[sync] concurrency`` stays the bound of requests in flight for the whole
sync (shared out between the workers). Either way the same function reads a customer
(``read_customer``), and the pages come back in order, so sync records each page while the next
ones are read (``comms.sync.service``).

Workers are started with ``spawn`` (no fork of a process holding database connections and
threads); each opens its own HTTPS session, Partner Center token and customer-tenant
applications, once. An error that stops the sync (a configuration or sign-in problem,
``AuthError``) reaches the caller as the same exception.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import requests

from comms.config import Settings, worker_processes
from comms.delivery.auth import make_session
from comms.errors import SyncWorkerFailed
from comms.sync import clients, partner
from comms.sync.ledger import CustomerSync

POOL_MIN_CUSTOMERS = 2000  # fewer customers are read in this process: a worker starts in ~1 s
PAGE = 250  # customers per page: read by one worker, then recorded in one transaction


@dataclass
class Job:
    """One customer to read: its tenant, what was read of it so far (the partner listings),
    and the direct subscription its last tenant evidence identified (``_candidate``)."""

    id: int
    tenant_id: str
    result: CustomerSync
    previous: dict[str, Any] | None = None


class Readers:
    """What one process reads customers with: one HTTPS session, the read retries, and a
    client per enabled source (the partner listings are read by the caller only)."""

    def __init__(self, settings: Settings, sources: Iterable[str]) -> None:
        self.settings = settings
        self.session = open_session(settings)
        self.reader = clients.Reader(self.session, max_attempts=settings.sync.max_attempts,
                                     time_scale=settings.delivery.time_scale)
        try:
            self.pc = partner.PartnerCenter(settings, self.session, self.reader) \
                if "partner_center" in sources else None
            self.tenant = clients.CustomerTenant(settings, self.session, self.reader) \
                if "tenant" in sources else None
        except BaseException:
            self.session.close()
            raise

    def close(self) -> None:
        if self.tenant is not None:
            self.tenant.close()
        self.session.close()


def open_session(settings: Settings) -> requests.Session:
    """The Graph transport's session (timeouts, CA trust), sized for ``[sync] concurrency``."""
    session = make_session(settings.graph)
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=4, pool_maxsize=max(16, settings.sync.concurrency * 2), max_retries=0,
    )
    session.mount("https://", adapter)
    return session


def read_customer(readers: Readers, job: Job) -> CustomerSync:
    """Read one customer: the partner's subscriptions of it (when Partner Center lists it) and
    its tenant's direct subscription. Its problems are recorded on its result, never raised;
    only what stops the whole sync (``AuthError``: configuration, sign-in) is."""
    res = job.result
    if readers.pc is not None and is_listed(res):
        pc = readers.pc
        _guard(res, "partner_center", lambda: _csp(res, pc.subscriptions(job.tenant_id)))
    if readers.tenant is not None:
        tenant = readers.tenant
        if problem := _unreadable_tenant(job.tenant_id, readers.settings):
            res.problems["tenant"] = problem
        else:
            _guard(res, "tenant", lambda: _direct(
                res, readers.settings, *tenant.read(job.tenant_id), tenant_id=job.tenant_id,
                previous=job.previous))
    return res


@dataclass
class Page:
    """A page read: its customers' results, in the order given, and the retries it took."""

    results: list[CustomerSync]
    retries: int


def _read_page(readers: Readers, threads: ThreadPoolExecutor, jobs: list[Job]) -> Page:
    before = readers.reader.retries
    results = list(threads.map(lambda job: read_customer(readers, job), jobs))
    return Page(results, readers.reader.retries - before)


class PageReader:
    """Reads pages of customers, ``in_flight`` pages ahead of the caller, and gives them back
    in order: in this process (threads) or in worker processes."""

    def __init__(self, settings: Settings, sources: tuple[str, ...], customers: int,
                 readers: Readers) -> None:
        """``customers``: how many have something to read; ``readers``: this process's own,
        used unless the pages go to worker processes."""
        processes = worker_processes(settings.sync.processes)
        self.pooled = processes > 1 and customers > POOL_MIN_CUSTOMERS
        concurrency = settings.sync.concurrency
        self._pool: ProcessPoolExecutor | None = None
        self._readers = readers
        self._threads: ThreadPoolExecutor | None = None
        self._pages: ThreadPoolExecutor | None = None
        if self.pooled:
            self._pool = ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(settings, sources, max(1, -(-concurrency // processes))),
            )
            self.in_flight = processes * 2
        else:
            self._threads = ThreadPoolExecutor(max_workers=concurrency,
                                               thread_name_prefix="comms-sync")
            self._pages = ThreadPoolExecutor(max_workers=1, thread_name_prefix="comms-sync-page")
            self.in_flight = 2

    def _submit(self, jobs: list[Job]) -> Future[Page]:
        if self._pool is not None:
            try:
                return self._pool.submit(_read_page_in_worker, jobs)
            except BrokenProcessPool as exc:
                raise _worker_died(exc) from exc
        assert self._pages is not None and self._threads is not None
        return self._pages.submit(_read_page, self._readers, self._threads, jobs)

    def read(self, pages: Iterable[list[Job]],
             before: Callable[[list[Job]], None] | None = None) -> Iterator[tuple[list[Job], Page]]:
        """Each page with what was read of it, in order; ``before`` is called on a page just
        before it is handed out to be read (to attach what it needs from the ledger)."""
        waiting: deque[tuple[list[Job], Future[Page]]] = deque()
        source = iter(pages)
        try:
            while True:
                while len(waiting) < self.in_flight:
                    jobs = next(source, None)
                    if jobs is None:
                        break
                    if before is not None:
                        before(jobs)
                    waiting.append((jobs, self._submit(jobs)))
                if not waiting:
                    return
                jobs, future = waiting.popleft()
                try:
                    page = future.result()
                except BrokenProcessPool as exc:
                    raise _worker_died(exc) from exc
                yield jobs, page
        finally:
            for _, future in waiting:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._pages is not None:
            self._pages.shutdown(wait=True, cancel_futures=True)
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- worker processes

_worker: tuple[Readers, ThreadPoolExecutor] | None = None


def _start_worker(settings: Settings, sources: tuple[str, ...], threads: int) -> None:
    global _worker
    # The sync itself decides how to stop (Ctrl-C reaches the whole process group, systemd
    # signals the whole unit); a worker never stops on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker = (Readers(settings, sources),
               ThreadPoolExecutor(max_workers=threads, thread_name_prefix="comms-sync"))


def _read_page_in_worker(jobs: list[Job]) -> Page:
    assert _worker is not None, "sync worker started without its readers"
    return _read_page(*_worker, jobs)


def _worker_died(exc: BrokenProcessPool) -> SyncWorkerFailed:
    return SyncWorkerFailed(
        f"A sync worker process stopped unexpectedly ({exc}): killed, or out of memory. The "
        "pages read before it were recorded; nothing else was. Run `comms sync` again; if it "
        "happens again, set [sync] processes = 1 to read in this process."
    )


# --------------------------------------------------------------------------- one customer's read


def is_listed(res: CustomerSync) -> bool:
    """Partner Center lists the customer (its reseller relationship is accepted)."""
    return bool(res.seen.get("partner_center", {}).get("listed"))


def _unreadable_tenant(tid: str, settings: Settings) -> str:
    """Why a customer's tenant is not read ("" when it is)."""
    if not tid:
        return ("cannot verify: no tenant id (add tenant_id to the CSV, or enable "
                "[sync] partner_center to find it by domain)")
    if tid.lower() == settings.graph.tenant_id.strip().lower():
        return (f"cannot verify: tenant id {tid} is your own tenant ([graph] tenant_id), not "
                "the customer's; set the customer's tenant_id in the CSV and re-import")
    return ""


def _guard(res: CustomerSync, source: str, call: Callable[[], None]) -> None:
    try:
        call()
    except clients.NoAccess as exc:
        res.problems[source] = (
            f"cannot verify: no consent/role ({exc.message}); grant admin consent to the "
            "app in the customer's tenant (Organization.Read.All) or a GDAP role such as "
            "Global Reader")
        res.seen.pop(source, None)
    except clients.SourceFailed as exc:
        res.problems[source] = f"failed: {exc.message}"
        res.failed = True
        res.seen.pop(source, None)


def _csp(res: CustomerSync, subs: list[dict[str, Any]]) -> None:
    """The partner's subscriptions of the customer, with what tells a licence-based seat
    subscription (``billingType``, ``unitType``, ``productType``, ``offerId``) from an Azure
    plan or a trial (``isTrial``): only the former make the CSP subscription live
    (``comms.sync.ledger.facts_of``, which reads ``subscriptions``). An add-on
    (``parentSubscriptionId``: Audio Conferencing, E5 Compliance...) is kept apart, under
    ``add_ons`` (only when there is one, so that evidence recorded before is unchanged): it
    is no base subscription, and an active add-on alone does not make the CSP subscription
    live."""
    seen = res.seen["partner_center"]
    summaries = [_summary(s) for s in subs]
    seen["subscriptions"] = sorted((s for s in summaries if not s.get("parent")),
                                   key=lambda s: str(s["id"]))
    if add_ons := sorted((s for s in summaries if s.get("parent")), key=lambda s: str(s["id"])):
        seen["add_ons"] = add_ons


def _summary(s: dict[str, Any]) -> dict[str, Any]:
    """What is recorded of one Partner Center subscription (``parent`` for an add-on only)."""
    out = {"id": s.get("id"), "offer": s.get("offerName") or s.get("offerId"),
           "offer_id": s.get("offerId"), "quantity": s.get("quantity"),
           "status": s.get("status"), "start": s.get("effectiveStartDate"),
           "trial": s.get("isTrial"), "billing": s.get("billingType"),
           "unit": s.get("unitType"),
           "product": (s.get("productType") or {}).get("id")
           if isinstance(s.get("productType"), dict) else None}
    if s.get("parentSubscriptionId"):
        out["parent"] = s.get("parentSubscriptionId")
    return out


def _direct(
    res: CustomerSync,
    settings: Settings,
    subs: list[dict[str, Any]],
    skus: list[dict[str, Any]],
    *,
    tenant_id: str = "",
    previous: dict[str, Any] | None = None,
) -> None:
    """What the customer's tenant (``tenant_id``, recorded with what was seen) shows of its
    direct subscription, the one to cancel (``_candidate``). Its status and licences only:
    never those of another product. When which one it is cannot be told, the status is
    "unknown" (no claim either way, nothing moves, no licence count) and the customer is
    reported as not verifiable."""
    partner = settings.graph.tenant_id.strip().lower()
    csp_skus = {s.get("skuId") for s in subs
                if str(s.get("ownerTenantId") or "").lower() == partner and s.get("skuId")}
    free = {k.upper() for k in settings.sync.free_skus}
    # Direct: bought from Microsoft, created by no partner. ``ownerTenantId`` is "the partner
    # tenant that has created the subscription on a customer tenant" (Graph): one created by
    # an indirect provider for us, or by another reseller, is nobody's old direct one (it was
    # taken for it: the new subscription read as the old one, "still active").
    own = {"", tenant_id.strip().lower()}
    direct = [s for s in subs if str(s.get("ownerTenantId") or "").lower() in own
              and s.get("isTrial") is not True
              and str(s.get("skuPartNumber") or "").upper() not in free]
    group, several = _candidate(direct, csp_skus, tenant_id, previous)
    seen: dict[str, Any] = {"tenant_id": tenant_id, "status": "absent"}
    if group:
        main = group[0]
        sku = next((k for k in skus if k.get("skuId") == main.get("skuId")), None)
        seen.update(id=main.get("id"), sku=main.get("skuPartNumber"),
                    status=main.get("status"),
                    total=sum(int(g.get("totalLicenses") or 0) for g in group)
                    if len(group) > 1 else main.get("totalLicenses"),
                    assigned=sku.get("consumedUnits") if sku else None)
        if len(group) > 1:
            seen["ids"] = sorted(str(g.get("id")) for g in group)
    elif several:
        seen.update(status="unknown", several=several)
        res.problems["tenant"] = (
            f"cannot verify: several products billed directly ({', '.join(several)}), none "
            "known to be the one the CSP subscription replaces; its status and licences are "
            "not taken from another product: set the stage by hand when it is cancelled")
    elif _followed(previous, tenant_id):
        # Gone from the directory it was seen in: keep following it (and its twins), so that
        # a later reading does not take another product for it.
        prev = previous or {}
        seen.update({k: prev[k] for k in ("id", "ids", "sku") if prev.get(k)})
    res.seen["tenant"] = seen


# Statuses from most to least alive: a group of subscriptions of one product shows the most
# alive of its members (one still Enabled beside a cancelled twin still bills).
_ALIVE = ("Enabled", "Warning", "LockedOut")
_CANCELLED = ("Suspended", "Disabled", "Deleted")


def _alive_rank(sub: dict[str, Any]) -> tuple[int, int]:
    status = str(sub.get("status") or "")
    rank = (_ALIVE.index(status) if status in _ALIVE
            else len(_ALIVE) + 1 + _CANCELLED.index(status) if status in _CANCELLED
            else len(_ALIVE))  # an unknown status: below the live ones, above the cancelled
    return rank, -int(sub.get("totalLicenses") or 0)


def _ids(previous: dict[str, Any] | None) -> list[str]:
    """The ids a previous reading identified as the direct one (``ids``, else ``id``)."""
    prev = previous or {}
    return [str(i) for i in (prev.get("ids") or ([prev["id"]] if prev.get("id") else []))]


def _followed(previous: dict[str, Any] | None, tenant_id: str) -> list[str]:
    """The ids the previous reading of this same tenant identified as the direct one."""
    same = bool(tenant_id) and (previous or {}).get("tenant_id") == tenant_id
    return _ids(previous) if same else []


def _candidate(
    direct: list[dict[str, Any]],
    csp_skus: set[Any],
    tenant_id: str,
    previous: dict[str, Any] | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the direct subscriptions being replaced, most alive first, or []; the products when
    which one it is is unknown).

    1. The ones identified by the previous tenant evidence (``id``, ``ids``), followed whatever
       other products show: once they left the directory of that same tenant, they are gone
       ("absent"), never replaced by another product.
    2. Else direct subscriptions with the SKU of one of the partner's CSP subscriptions in
       the tenant (the product being replaced), others (free, add-ons) left out.
    3. Else the direct products, when they are one product; several products (none named by a
       CSP subscription): unknown.
    Every direct subscription of that one product counts (two subscriptions of one product:
    cancelling one leaves the other billing): the group shows its most alive status."""
    followed = _ids(previous)
    if followed:
        found = [s for s in direct if str(s.get("id")) in followed]
        if found:
            skus = {s.get("skuId") for s in found}
            return sorted([s for s in direct if s.get("skuId") in skus],
                          key=_alive_rank), []
        if _followed(previous, tenant_id):
            return [], []
    pool = [s for s in direct if s.get("skuId") in csp_skus] or direct
    products = sorted({str(s.get("skuPartNumber") or s.get("skuId")) for s in pool})
    if len(products) > 1:
        return [], products
    return sorted(pool, key=_alive_rank), []
