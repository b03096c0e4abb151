"""Identity: proving an email address with a BrowserID backed identity assertion."""

from presence.identity.issuer import Issuer, make_assertion, new_user_key
from presence.identity.jws import IdentityError
from presence.identity.support import Authority, NoSupport, SupportDocument, SupportDocuments
from presence.identity.verifier import Identity, Verifier, normalize_origin

__all__ = [
    "Authority",
    "Identity",
    "IdentityError",
    "Issuer",
    "NoSupport",
    "SupportDocument",
    "SupportDocuments",
    "Verifier",
    "make_assertion",
    "new_user_key",
    "normalize_origin",
]
