"""Built-in plugins (installed as ``bluelm_v.plugins``), one module per family.

Each module is listed under the ``bluelm_v`` entry-point group in pyproject.toml and loaded by
the same code path as a third-party package. For convenience this package also re-exports the
plugin manager (``bluelm_v.plugins.get()``), which lives in ``bluelm_v.plugin_manager`` because
the name ``bluelm_v.plugins`` belongs to this package.
"""
from bluelm_v.plugin_manager import (  # noqa: F401
    AUTOLOAD_ENV, ENTRY_POINT_GROUP, LoadReport, from_config, get, load_plugins, new_manager,
)
