"""Built-in expansion schemes, one file per scheme, file name == scheme name. Importing this package registers
them (in this order)."""

import importlib

ORDER = ("repvgg", "acnet", "dbb", "mobileone", "qarepvgg")

for _name in ORDER:
    importlib.import_module(f"{__name__}.{_name}")
