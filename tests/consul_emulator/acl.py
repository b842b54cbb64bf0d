"""ACL enforcement of the emulated agent: tokens, policies written in HCL rules, and Consul's answers.

What it follows (https://developer.hashicorp.com/consul/docs/security/acl, agent/acl*.go, acl/errors.go):
- a request's token comes from ``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=``; none means the
  anonymous token, which has no policies here, so ``default_policy`` decides for it;
- an unknown token is 403 ``ACL not found`` on every endpoint that resolves tokens;
- a write or a single-object read the token may not do is 403 ``Permission denied: token with AccessorID
  '<id>' lacks permission '<resource>:<level>' on "<name>"``;
- list reads are filtered: entries the token may not see vanish, the answer stays 200 (``[]`` when nothing is
  left), and ``X-Consul-Results-Filtered-By-ACLs: true`` says so, except for the anonymous token (Consul masks
  the header there so as not to leak that something exists);
- rules: ``service``/``node``/``agent``/``key`` with a name, their ``*_prefix`` forms (an exact rule beats any
  prefix, the longest prefix wins), and bare ``acl``/``operator``/``keyring`` levels; ``deny`` beats
  ``write`` beats ``read`` when several policies of one token speak about the same rule.
Not emulated: roles, service and node identities, templated policies, token expiry, namespaces.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
LEVELS = {"deny": 0, "list": 1, "read": 1, "write": 2}
NAMED_RESOURCES = ("service", "node", "agent", "key", "session", "event", "query")
GLOBAL_RESOURCES = ("acl", "operator", "keyring", "mesh", "peering")
_BLOCK_RE = re.compile(r'(\w+)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"\s*\}')
_GLOBAL_RE = re.compile(r'^\s*(\w+)\s*=\s*"(\w+)"\s*$', re.MULTILINE)


class AclNotFound(Exception):
    """403 ``ACL not found``: the token is not known."""

    def __str__(self) -> str:
        return "ACL not found"


class PermissionDenied(Exception):
    """403 ``Permission denied: ...`` with Consul's wording."""

    def __init__(self, accessor: str, resource: str, level: str, name: str | None) -> None:
        on = f' on "{name}"' if name is not None else ""
        super().__init__(f"Permission denied: token with AccessorID '{accessor}' lacks permission '{resource}:{level}'{on}")


class InvalidPolicy(Exception):
    """400: the rules do not parse."""


def _combine(old: int | None, new: int) -> int:
    if old is None:
        return new
    if 0 in (old, new):
        return 0  # deny wins
    return max(old, new)


@dataclass
class Policy:
    policy_id: str
    name: str
    rules: str
    description: str = ""
    exact: dict[tuple[str, str], int] = field(default_factory=dict)
    prefix: dict[tuple[str, str], int] = field(default_factory=dict)
    globals: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, policy_id: str, name: str, rules: str, description: str = "") -> Policy:
        policy = cls(policy_id, name, rules, description)
        consumed = _BLOCK_RE.sub("", rules)
        for kind, target, level in _BLOCK_RE.findall(rules):
            if level not in LEVELS:
                raise InvalidPolicy(f'Failed to parse ACL rules: Invalid policy: "{level}"')
            base, is_prefix = (kind[: -len("_prefix")], True) if kind.endswith("_prefix") else (kind, False)
            if base not in NAMED_RESOURCES:
                raise InvalidPolicy(f"Failed to parse ACL rules: unknown resource {kind!r}")
            table = policy.prefix if is_prefix else policy.exact
            table[(base, target)] = _combine(table.get((base, target)), LEVELS[level])
        for resource, level in _GLOBAL_RE.findall(consumed):
            if resource not in GLOBAL_RESOURCES or level not in LEVELS:
                raise InvalidPolicy(f"Failed to parse ACL rules: invalid {resource} = {level!r}")
            policy.globals[resource] = _combine(policy.globals.get(resource), LEVELS[level])
            consumed = consumed.replace(f'{resource} = "{level}"', "", 1)
        if re.sub(r"#.*", "", consumed).strip():
            raise InvalidPolicy(f"Failed to parse ACL rules: cannot parse {consumed.strip()[:80]!r}")
        return policy

    def json(self) -> dict[str, object]:
        return {"ID": self.policy_id, "Name": self.name, "Description": self.description, "Rules": self.rules,
                "Datacenters": None}


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    policy_ids: list[str]
    description: str = ""
    management: bool = False

    def json(self, policies: dict[str, Policy]) -> dict[str, object]:
        links = [{"ID": pid, "Name": policies[pid].name} for pid in self.policy_ids if pid in policies]
        if self.management:
            links.append({"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"})
        return {"AccessorID": self.accessor_id, "SecretID": self.secret_id, "Description": self.description,
                "Policies": links, "Local": False}


class Authorizer:
    """What one resolved token may do (merged over its policies, then the default policy)."""

    def __init__(self, token: Token | None, policies: list[Policy], default_allow: bool) -> None:
        self.accessor = token.accessor_id if token is not None else ANONYMOUS_ACCESSOR
        self.anonymous = token is None
        self._management = token is not None and token.management
        self._default = LEVELS["write"] if default_allow else LEVELS["deny"]
        self._exact: dict[tuple[str, str], int] = {}
        self._prefix: dict[tuple[str, str], int] = {}
        self._globals: dict[str, int] = {}
        for policy in policies:
            for key, level in policy.exact.items():
                self._exact[key] = _combine(self._exact.get(key), level)
            for key, level in policy.prefix.items():
                self._prefix[key] = _combine(self._prefix.get(key), level)
            for key, level in policy.globals.items():
                self._globals[key] = _combine(self._globals.get(key), level)

    def level(self, resource: str, name: str | None) -> int:
        if self._management:
            return LEVELS["write"]
        if name is None:
            return self._globals.get(resource, self._default)
        if (resource, name) in self._exact:
            return self._exact[(resource, name)]
        matches = [(len(prefix), level) for (kind, prefix), level in self._prefix.items()
                   if kind == resource and name.startswith(prefix)]
        return max(matches)[1] if matches else self._default

    def allowed(self, resource: str, name: str | None, level: str) -> bool:
        return self.level(resource, name) >= max(LEVELS[level], 1)

    def require(self, resource: str, name: str | None, level: str) -> None:
        if not self.allowed(resource, name, level):
            raise PermissionDenied(self.accessor, resource, level, name)


class AclStore:
    """Tokens and policies of the emulated datacenter; ``enabled`` False means ACLs are off (all allowed)."""

    def __init__(self, default_policy: str | None = None, management_token: str | None = None) -> None:
        if default_policy not in (None, "allow", "deny"):
            raise ValueError("default_policy must be allow or deny")
        self.enabled = default_policy is not None
        self.default_policy = default_policy or "allow"
        self.policies: dict[str, Policy] = {}
        self.tokens: dict[str, Token] = {}  # by secret
        if self.enabled and management_token:
            self.tokens[management_token] = Token(str(uuid.uuid4()), management_token, [], "initial management",
                                                  management=True)

    def resolve(self, secret: str) -> Authorizer:
        """Raises :class:`AclNotFound` for an unknown token; ``""`` is the anonymous token."""
        if not self.enabled:
            return Authorizer(None, [], default_allow=True)
        if not secret:
            return Authorizer(None, [], default_allow=self.default_policy == "allow")
        token = self.tokens.get(secret)
        if token is None:
            raise AclNotFound()
        return Authorizer(token, [self.policies[p] for p in token.policy_ids if p in self.policies],
                          default_allow=self.default_policy == "allow")

    def policy_by_name(self, name: str) -> Policy | None:
        return next((p for p in self.policies.values() if p.name == name), None)

    def add_policy(self, name: str, rules: str, description: str = "") -> Policy:
        if not name:
            raise InvalidPolicy("Invalid Policy: no Name is set")
        if self.policy_by_name(name) is not None:
            raise InvalidPolicy(f"Invalid Policy: A Policy with Name {name!r} already exists")
        policy = Policy.parse(str(uuid.uuid4()), name, rules, description)
        self.policies[policy.policy_id] = policy
        return policy

    def add_token(self, policy_refs: list[dict[str, str]], secret: str | None = None, description: str = "") -> Token:
        ids = []
        for ref in policy_refs:
            policy = self.policies.get(ref.get("ID", "")) or self.policy_by_name(ref.get("Name", ""))
            if policy is None:
                raise InvalidPolicy(f"cannot find policy {ref.get('ID') or ref.get('Name')!r}")
            ids.append(policy.policy_id)
        secret = secret or str(uuid.uuid4())
        if secret in self.tokens:
            raise InvalidPolicy("Invalid Token: SecretID is already in use")
        token = Token(str(uuid.uuid4()), secret, ids, description)
        self.tokens[secret] = token
        return token

    def delete_token(self, accessor_id: str) -> bool:
        for secret, token in list(self.tokens.items()):
            if token.accessor_id == accessor_id and not token.management:
                del self.tokens[secret]
                return True
        return False

    def delete_policy(self, policy_id: str) -> bool:
        return self.policies.pop(policy_id, None) is not None
