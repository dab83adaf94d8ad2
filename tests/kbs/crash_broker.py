"""Subprocess for tests/kbs/test_broker_crash.py: a broker built from a production ``kbs.yaml``.

    python crash_broker.py CONFIG LAUNCH_HEX_FILE

Everything comes from the configuration (TLS with mutual-TLS owners, encrypted file store under a
master key file, the real audit log with group commit) through the same ``BrokerConfig.from_yaml``
and ``build`` as ``kbs serve --config``. The one departure: no TEE exists here, so the broker trusts
the simulated roots in LAUNCH_HEX_FILE (``DevRootOfTrust.to_launch_data``), which a production broker
refuses, and therefore issues ``env=dev`` tokens. Prints ``READY <port> <owner_port>`` once serving;
the test kills it with SIGKILL, or stops it with SIGTERM.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def main(config_path: str, launch_path: str) -> int:
    from ray_confidential.kbs.config import BrokerConfig, build
    from ray_confidential.testing.simulated import DevRootOfTrust

    config = BrokerConfig.from_yaml(config_path)
    roots = DevRootOfTrust.from_launch_data(bytes.fromhex(Path(launch_path).read_text()))
    config = dataclasses.replace(
        config, settings=dataclasses.replace(config.settings, env="dev"), trust=roots.trust_config()
    )
    server, broker = build(config)
    port = server.start()
    server.install_signal_handlers(grace=1.0)
    print(f"READY {port} {server.owner_port}", flush=True)
    server.wait()
    broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
