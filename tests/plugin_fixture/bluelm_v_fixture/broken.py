"""A plugin module that fails at import time, as a mis-packaged plugin would."""
raise ImportError("bluelm_v_fixture.broken needs a module that is not installed (on purpose)")
