"""The metadata database (docs/database.md): tables, engine, migrations, the service's queries.

Importing it connects to nothing; :meth:`Store.open` does. Migration commands live in
``deployflag.store.migrate``.
"""

from deployflag.store.repository import Claim, Folded, Store

__all__ = ["Claim", "Folded", "Store"]
