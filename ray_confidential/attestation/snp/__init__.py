"""AMD SEV-SNP backend: ``abi`` (report bytes <-> record), ``verify`` (VCEK/VLEK signature, AMD chain),
``validate`` (reference values). TEE kind ``"sev-snp"``.

    >>> from ray_confidential.attestation.snp import TEE, Policy, validate_claims, verify_evidence
    >>> TEE
    'sev-snp'

Evidence container: the 1184-byte ATTESTATION_REPORT (AMD doc 56860), optionally followed by the GHCB
certificate table of an extended report (entries GUID || offset u32 || length u32, all-zero terminator,
offsets relative to the table start; GUIDs: VCEK 63da758d-..., VLEK a8074bc2-..., ASK/ASVK 4ab7b379-...,
ARK c0b406a4-...). Certificates may also come as ``certs`` (DER or PEM, any order); ``collateral`` is
optional AMD KDS CRL(s), DER or PEM.

``VerifiedClaims.details`` keys: ``version``, ``vmpl``, ``policy`` (int), ``guest_svn``,
``reported_tcb`` / ``current_tcb`` / ``committed_tcb`` / ``launch_tcb`` (dicts ``bl, tee, snp, ucode``
[+ ``fmc`` on Turin]), ``chip_id`` (64 bytes), ``product`` ("Milan"/"Genoa"/"Turin"), ``signing_key``
("vcek"/"vlek"), ``host_data``, ``family_id``, ``image_id``, ``id_key_digest``, ``author_key_digest``,
``report_id`` (bytes), ``platform_info`` (int), ``smt_allowed``, ``migrate_ma`` (bool), ``firmware``
("major.minor.build"), ``vcek_sha256`` (hex of the leaf certificate). ``measurements`` =
``{"measurement": 48 bytes}``; ``tcb_status`` is always ``unknown`` (AMD publishes no TCB status).
"""

from ray_confidential.attestation.snp.abi import SNPReport, TCBVersion
from ray_confidential.attestation.snp.validate import Policy, validate_claims
from ray_confidential.attestation.snp.verify import TEE, verify_evidence

__all__ = ["TEE", "Policy", "SNPReport", "TCBVersion", "validate_claims", "verify_evidence"]
