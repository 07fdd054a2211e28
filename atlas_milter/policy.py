"""Owns the decisions about a message: cutoffs and labels (score -> ham / unsure / spam),
sender lists, per-recipient rules and the [milter] policy that turns a verdict into an
`Action`, including the verdicts of messages that are not scored (skipped, deny-listed,
unchecked). Pure functions and immutable objects over frozen values; no I/O, no state.
Front doors only map the Action to their protocol (milter reply, IMAP move); they hold no
thresholds."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from atlas_milter.config import ClassifierConfig, MilterConfig, normalise_address
from atlas_milter.verdict import HAM, SKIPPED, SPAM, UNCHECKED, UNSURE, Action, Score, Verdict


@dataclass(frozen=True, slots=True)
class Cutoffs:
    spam: float  # score >= spam  -> spam
    ham: float  # score < ham    -> ham; in between -> unsure

    def __post_init__(self) -> None:
        if not 0.0 <= self.ham <= self.spam <= 1.0:
            raise ValueError(f"cutoffs out of order: ham {self.ham}, spam {self.spam}")


def resolve_cutoffs(classifier: ClassifierConfig, model: Any) -> Cutoffs:
    """The cutoffs in force: [classifier] spam_cutoff / ham_cutoff where set (non-zero), else
    the model's own; the ham cutoff never above the spam cutoff."""
    spam = classifier.spam_cutoff or model.spam_cutoff
    return Cutoffs(spam=spam, ham=min(classifier.ham_cutoff or model.ham_cutoff, spam))


def label_for(score: float, cutoffs: Cutoffs) -> str:
    if score >= cutoffs.spam:
        return SPAM
    if score < cutoffs.ham:
        return HAM
    return UNSURE


def decide(score: Score, cutoffs: Cutoffs, cache_hit: bool = False) -> Verdict:
    return Verdict(
        verdict=label_for(score.score, cutoffs),
        score=score.score,
        reasons=score.reasons,
        model_version=score.model_version,
        cache_hit=cache_hit,
        spam_cutoff=cutoffs.spam,
        ham_cutoff=cutoffs.ham,
    )


# --- verdicts of messages the classifier does not score -------------------------------


def skipped_verdict(model_version: str) -> Verdict:
    """Not scored by policy (authenticated, trusted network, allow-listed sender)."""
    return Verdict(verdict=SKIPPED, score=0.0, model_version=model_version)


def deny_listed_verdict(model_version: str) -> Verdict:
    """A deny-listed sender: spam by policy, whatever the content."""
    return Verdict(verdict=SPAM, score=1.0, reasons=(("deny-listed sender", 1.0),), model_version=model_version)


def unchecked_verdict(error: str, model_version: str) -> Verdict:
    """Classification failed (`error` says how): the failure action applies."""
    return Verdict(verdict=UNCHECKED, score=0.0, error=error, model_version=model_version)


# --- senders and recipients -------------------------------------------------------------

SKIP_AUTHENTICATED = "authenticated"
SKIP_TRUSTED = "trusted_network"
SKIP_ALLOWED = "allow_listed"

DELIVERING = frozenset({Action.TAG, Action.ACCEPT})
# With several recipients whose policies differ, the action that keeps the mail best wins:
# delivered > held for an admin > retried by the sender > refused > silently dropped.
KEEP_RANK = {Action.TAG: 0, Action.ACCEPT: 0, Action.QUARANTINE: 1, Action.TEMPFAIL: 2, Action.REJECT: 3,
             Action.DISCARD: 4}


class SenderList:
    """Envelope senders: "a@x.org" (one address), "x.org" or "@x.org" (that domain),
    ".x.org" (its subdomains)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.addresses: set[str] = set()
        self.domains: set[str] = set()
        self.suffixes: list[str] = []
        for entry in entries:
            e = normalise_address(entry)
            if not e:
                continue
            if e.startswith("."):
                self.suffixes.append(e)
            elif e.startswith("@"):
                self.domains.add(e[1:])
            elif "@" in e:
                self.addresses.add(e)
            else:
                self.domains.add(e)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.domains or self.suffixes)

    def matches(self, sender: str) -> bool:
        s = normalise_address(sender)
        if not s:
            return False
        if s in self.addresses:
            return True
        domain = s.rpartition("@")[2]
        return domain in self.domains or any(domain.endswith(suf) for suf in self.suffixes)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    note: str = ""
    mixed: bool = False
    required: float = 0.0  # the spam cutoff the message was judged against (X-Spam-Status)


class RecipientPolicy:
    """Global actions from [milter], overridden per recipient ([milter.recipients."a@x"])
    or per domain ([milter.domains."x"], which also covers its subdomains)."""

    def __init__(self, mc: MilterConfig) -> None:
        self.mc = mc
        self.recipients = mc.recipients
        self.domains = mc.domains
        self.per_recipient = bool(self.recipients or self.domains)

    def rule_for(self, rcpt: str) -> dict:
        addr = normalise_address(rcpt)
        rule = self.recipients.get(addr)
        if rule is not None:
            return rule
        domain = addr.rpartition("@")[2]
        while domain:
            rule = self.domains.get(domain)
            if rule is not None:
                return rule
            domain = domain.partition(".")[2]
        return {}

    def action_for(self, rule: dict, score: float, cutoffs: Cutoffs) -> Action:
        if rule.get("opt_out"):
            return Action.ACCEPT
        if "spam_cutoff" in rule or "ham_cutoff" in rule:
            spam = rule.get("spam_cutoff", cutoffs.spam)
            cutoffs = Cutoffs(spam=spam, ham=min(rule.get("ham_cutoff", cutoffs.ham), spam))
        label = label_for(score, cutoffs)
        if label == SPAM:
            return Action(rule.get("spam_action", self.mc.spam_action))
        if label == UNSURE:
            return Action(rule.get("unsure_action", self.mc.unsure_action))
        return Action.TAG

    def decide(self, recipients: list[str], score: float, cutoffs: Cutoffs) -> Decision:
        if not self.per_recipient or not recipients:
            return Decision(self.action_for({}, score, cutoffs), required=cutoffs.spam)
        actions = {r: self.action_for(self.rule_for(r), score, cutoffs) for r in recipients}
        distinct = set(actions.values())
        if len(distinct) == 1:
            return Decision(distinct.pop(), required=cutoffs.spam)
        if distinct & DELIVERING:
            final = Action.TAG  # delivered to all, and tagged so the others' filters can act
        else:
            final = min(distinct, key=KEEP_RANK.__getitem__)
        shown = ", ".join(f"{r.strip('<>')}={a}" for r, a in sorted(actions.items())[:10])
        return Decision(final, f"mixed recipients ({shown}): {final} so nobody loses mail they want", True,
                        required=cutoffs.spam)


class MessagePolicy:
    """The [milter] policy for one message, with the cutoffs of the scorer in force:
    whether it is scored at all, whether its sender is deny-listed, the action for its
    verdict and recipients, and the action when it could not be classified. Immutable;
    a reload builds a new one."""

    def __init__(self, mc: MilterConfig, cutoffs: Cutoffs) -> None:
        self.mc = mc
        self.cutoffs = cutoffs
        self.recipients = RecipientPolicy(mc)
        self.allow = SenderList(mc.allow_senders)
        self.deny = SenderList(mc.deny_senders)
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in mc.trusted_networks)

    def skip_reason(self, sender: str, authenticated: bool, client_addr: str | None) -> str:
        """Why the message is not scored (one of SKIP_*), or "" when it is."""
        if self.mc.skip_authenticated and authenticated:
            return SKIP_AUTHENTICATED
        if self.trusted and self._trusted_client(client_addr or ""):
            return SKIP_TRUSTED
        if self.allow and self.allow.matches(sender):
            return SKIP_ALLOWED
        return ""

    def _trusted_client(self, addr: str) -> bool:
        addr = addr.strip("[]")  # an address literal may arrive bracketed, IPv6 ones as [IPv6:...]
        if addr.lower().startswith("ipv6:"):
            addr = addr[5:]
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def deny_listed(self, sender: str) -> bool:
        return bool(self.deny) and self.deny.matches(sender)

    def decide(self, recipients: list[str], score: float) -> Decision:
        """The action for a message with this score and these envelope recipients."""
        return self.recipients.decide(recipients, score, self.cutoffs)

    def describe(self) -> str:
        """What is in force, for the reload's log line."""
        mc = self.mc
        return (f"cutoffs spam {self.cutoffs.spam:g} ham {self.cutoffs.ham:g}, spam_action={mc.spam_action}, "
                f"unsure_action={mc.unsure_action}, on_error={mc.on_error}, timeout {mc.timeout:g}s")

    def failure_action(self, busy: bool) -> Action:
        """on_busy when there was no room to classify, else on_error."""
        return Action(self.mc.on_busy if busy else self.mc.on_error)
