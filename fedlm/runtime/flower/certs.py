"""TLS material for a Flower deployment: a certificate authority and a SuperLink certificate.

`fedlm certs DIR --host superlink.example.org` writes `ca.crt` (give it to every SuperNode and to
whoever launches runs, `--root-certificates`), and `server.pem` / `server.key` (for the SuperLink,
`--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`). `ca.key` signs
them; keep it offline. `--node NAME` also writes a SuperNode's authentication key pair. For production, certificates from your organisation's CA are better; these
are for trying deployment across machines you control and for tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def make_certificates(folder: Path, hosts: list[str], valid_days: int = VALID_DAYS) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem and server.key into `folder`; the server certificate is
    valid for each of `hosts` (DNS names or IP addresses). Returns the paths by file name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlm deployment CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, valid_days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        _builder(server_name, ca_name, server_key.public_key(), now, valid_days)
        .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {
        "ca.crt": _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        "ca.key": _write(folder / "ca.key", _private_pem(ca_key), private=True),
        "server.pem": _write(folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        "server.key": _write(folder / "server.key", _private_pem(server_key), private=True),
    }
    return paths


def make_node_keys(folder: Path, name: str) -> dict[str, Path]:
    """A SuperNode's authentication key pair in OpenSSH format (EC P-384, what Flower expects):
    `NAME.key` stays on the SuperNode (`--auth-supernode-private-key`), `NAME.pub` is registered
    with the SuperLink (`flwr supernode register NAME.pub`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {
        f"{name}.key": _write(folder / f"{name}.key", private, private=True),
        f"{name}.pub": _write(folder / f"{name}.pub", public + f" {name}\n".encode()),
    }


def _builder(subject, issuer, public_key, now, valid_days) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path
