"""A module that tests/test_cli_server.py runs twice through the warm start: it writes into the
temporary directory that wandb made at import (the server's, shared by every child), registers an
exit handler of its own and logs to a file; exit code 3 if the shared directory is gone."""

import atexit
import logging
import sys
from pathlib import Path

from wandb.sdk.data_types._private import MEDIA_TMP

out = Path(sys.argv[1])
if not Path(MEDIA_TMP.name).is_dir():
    print("wandb's temporary directory is gone", file=sys.stderr)
    sys.exit(3)
(Path(MEDIA_TMP.name) / f"{out.name}.txt").write_text("used")
atexit.register(lambda: (out / "exit_handler_ran").write_text("yes"))
handler = logging.FileHandler(out / "log.txt")
logging.getLogger("exit_probe").addHandler(handler)
logging.getLogger("exit_probe").warning("logged")
print("done")
