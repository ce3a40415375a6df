"""The metadata database (SPEC §6): tables, engine, migrations and the few queries the service runs.

Importing it connects to nothing; :meth:`Store.open` does. Migration commands live in
``deployflag.store.migrate``.
"""

from deployflag.store.repository import Claim, Store

__all__ = ["Claim", "Store"]
