"""Emulated kernel interfaces for collector tests (configfs-tsm over a temporary directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray_confidential.attestation.collect.configfs_tsm import FileOps
from ray_confidential.testing.simulated import SimulatedTEE


class FakeTSM(FileOps):
    """Emulates the kernel side of configfs-tsm over a tmp directory: attribute files appear on mkdir,
    writes to inblob/privlevel bump ``generation``, reading outblob runs the provider."""

    def __init__(
        self, provider: str, make: Any, *, privlevel_floor: int | None = 0, interfere: bool = False
    ) -> None:
        self.provider, self.make, self.floor, self.interfere = provider, make, privlevel_floor, interfere
        self.instances: list[Path] = []
        self.removed: list[Path] = []
        self.writes: list[tuple[str, bytes]] = []

    def mkdir(self, path: Path) -> None:
        path.mkdir()
        self.instances.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        if self.floor is not None:
            (path / "privlevel").write_text("0\n")
            (path / "privlevel_floor").write_text(f"{self.floor}\n")

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
        self.removed.append(path)

    def write(self, path: Path, data: bytes) -> None:
        self.writes.append((path.name, data))
        if path.name not in ("inblob", "privlevel"):
            raise PermissionError(path)
        path.write_bytes(data)
        gen = path.parent / "generation"
        gen.write_text(f"{int(gen.read_text()) + 1}\n")

    def read(self, path: Path) -> bytes:
        if path.name == "outblob":
            inst = path.parent
            privlevel = int((inst / "privlevel").read_text()) if (inst / "privlevel").exists() else None
            out, aux = self.make((inst / "inblob").read_bytes(), privlevel)
            if aux is not None:
                (inst / "auxblob").write_bytes(aux)
            if self.interfere:  # another process writes inblob between our write and read
                gen = inst / "generation"
                gen.write_text(f"{int(gen.read_text()) + 1}\n")
            return bytes(out)
        return path.read_bytes()


def snp_maker(root: Any) -> Any:
    from ray_confidential.testing import snp_fake

    def make(inblob: bytes, privlevel: int | None) -> tuple[bytes, bytes]:
        # An extended report is the report followed by the GHCB certificate table: exactly what the
        # kernel splits into outblob and auxblob.
        fake = snp_fake.build_evidence(root, report_data=inblob, measurement=SimulatedTEE("sev-snp").measurement,
                                       vmpl=privlevel or 0, extended=True)  # fmt: skip
        return fake.evidence[:1184], fake.evidence[1184:]

    return make
