"""The ClientId template language (`clientid_template`): which certificate fields it names.

Kept apart from config.py (which validates a template) and policy.py (which expands one for a
client's certificate), so that neither has to import the other.
"""
from __future__ import annotations

import string

# Fields a template may use: `{cn}`, `dev-{san_dns}`, ... (PeerCertificate attributes in policy.py).
TEMPLATE_FIELDS = ("cn", "san_dns", "san_email", "san_uri", "serial", "fingerprint")


def template_fields(spec: str) -> list[str]:
    """Certificate fields a ClientId template uses; raises ValueError on a malformed template
    (the caller turns it into a ConfigError)."""
    return [f for _, f, _, _ in string.Formatter().parse(spec) if f]
