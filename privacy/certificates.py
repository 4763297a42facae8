"""TLS material for the coordinator and node-authentication keys for merchants (``cryptography`` only).

What it creates in ``out_dir``:

- ``ca.key`` / ``ca.crt``: a private certificate authority (EC P-384, CA:TRUE, pathlen 0).
- ``server.key`` / ``server.pem``: the coordinator's TLS certificate, signed by the CA, with the
  configured subject alternative names (DNS names and IP addresses) and serverAuth usage.
- ``merchants/<name>`` / ``merchants/<name>.pub``: one EC P-384 key pair per merchant in OpenSSH
  format, the form Flower's SuperNode authentication loads (``--auth-supernode-private-key``) and
  the SuperLink registers (``flwr supernode register <name>.pub``).

Guarantees: private keys are written with mode 0600, every file atomically; existing material is
never overwritten unless ``force`` is set (a refused run writes nothing).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storefed.atomic_files import atomic_write_bytes

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertificateRequest:
    out_dir: Path
    merchants: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    days: int = 365
    organization: str = "StoreFed"
    force: bool = False
    extra: dict = field(default_factory=dict, compare=False)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))


def _check(request: CertificateRequest) -> list[x509.GeneralName]:
    if request.days < 1:
        raise ValueError(f"certs.days must be >= 1, got {request.days}")
    for merchant in request.merchants:
        if not _NAME.match(merchant):
            raise ValueError(f"merchant name {merchant!r} is not usable as a file name: letters, digits, '_', '.', '-'")
    if len(set(request.merchants)) != len(request.merchants):
        raise ValueError("certs.merchants lists a merchant twice")
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in request.dns_names]
    for ip in request.ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"certs.ips entry {ip!r} is not an IP address (put host names in certs.dns)") from None
    if not sans:
        raise ValueError("the coordinator certificate needs at least one DNS name or IP address (certs.dns / certs.ips)")
    return sans


def planned_files(request: CertificateRequest) -> list[Path]:
    out = Path(request.out_dir)
    files = [out / "ca.key", out / "ca.crt", out / "server.key", out / "server.pem"]
    for merchant in request.merchants:
        files += [out / "merchants" / merchant, out / "merchants" / f"{merchant}.pub"]
    return files


def create_certificates(request: CertificateRequest) -> list[Path]:
    """Create CA, coordinator certificate and merchant keys; returns the files written."""
    sans = _check(request)
    existing = [p for p in planned_files(request) if p.exists()]
    if existing and not request.force:
        raise FileExistsError(
            f"refusing to overwrite existing key material: {', '.join(str(p) for p in existing[:4])}"
            f"{' ...' if len(existing) > 4 else ''}; pass certs.force=true to replace it"
        )
    out = Path(request.out_dir)
    ca_key = _key()
    ca_name = _name(f"{request.organization} coordinator CA", request.organization)
    ca_cert = (
        _validity(x509.CertificateBuilder(), request.days)
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = _key()
    server_cert = (
        _validity(x509.CertificateBuilder(), request.days)
        .subject_name(_name(str(sans[0].value), request.organization))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    written = [
        _write(out / "ca.key", _pem_key(ca_key), private=True),
        _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / "server.key", _pem_key(server_key), private=True),
        _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
    ]
    for merchant in request.merchants:
        written += create_merchant_key(out / "merchants", merchant)
    return written


def create_merchant_key(directory: Path, merchant: str) -> list[Path]:
    """One merchant's node-authentication key pair (EC P-384, OpenSSH format)."""
    key = _key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [
        _write(Path(directory) / merchant, private, private=True),
        _write(Path(directory) / f"{merchant}.pub", public + f" {merchant}\n".encode()),
    ]


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    atomic_write_bytes(path, data, mode=0o600 if private else 0o644)
    return path
