"""`storefed certs`: a CA, a coordinator certificate with SANs, merchant node keys Flower can load."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from conftest import ROOT
from storefed.privacy.certificates import CertificateRequest, create_certificates


def _certs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storefed", "certs", *args], capture_output=True, text=True, cwd=ROOT)


def test_certs_command_creates_a_verifiable_chain_and_loadable_node_keys(tmp_path):
    out = tmp_path / "certs"
    done = _certs(f"out_dir={out}", "merchants=[shop-a,shop-b]", "dns=[localhost,fed.example.com]", "ips=[127.0.0.1,10.1.2.3]", "days=30")
    assert done.returncode == 0, done.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer do not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fed.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 <= lifetime.days <= 31
    for merchant in ("shop-a", "shop-b"):
        private = load_ssh_private_key((out / "merchants" / merchant).read_bytes(), password=None)
        public = load_ssh_public_key((out / "merchants" / f"{merchant}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
    for private_file in [out / "ca.key", out / "server.key", out / "merchants" / "shop-a"]:
        assert stat.S_IMODE(private_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.crt").stat().st_mode) == 0o644


def test_existing_material_is_not_overwritten_unless_forced(tmp_path):
    out = tmp_path / "certs"
    assert _certs(f"out_dir={out}", "merchants=[shop-a]").returncode == 0
    before = (out / "ca.key").read_bytes()
    again = _certs(f"out_dir={out}", "merchants=[shop-a]")
    assert again.returncode == 2 and "refusing to overwrite existing key material" in again.stderr
    assert "certs.force=true" in again.stderr and (out / "ca.key").read_bytes() == before
    assert _certs(f"out_dir={out}", "merchants=[shop-a]", "force=true").returncode == 0
    assert (out / "ca.key").read_bytes() != before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ip_addresses": ("fed.example.com",)}, "is not an IP address"),
        ({"merchants": ("../evil",)}, "not usable as a file name"),
        ({"merchants": ("a", "a")}, "twice"),
        ({"days": 0}, "days must be >= 1"),
        ({"dns_names": (), "ip_addresses": ()}, "at least one DNS name or IP address"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_certificates(CertificateRequest(out_dir=tmp_path / "certs", **kwargs))
    assert not (tmp_path / "certs").exists()
