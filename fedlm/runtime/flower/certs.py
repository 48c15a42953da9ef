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
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedlm.errors import ConfigError
from fedlm.files import refuse_existing, write_new

VALID_DAYS = 365
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def make_certificates(
    folder: Path, hosts: list[str], valid_days: int = VALID_DAYS, force: bool = False
) -> dict[str, Path]:
    """Write ca.crt, ca.key, server.pem and server.key into `folder`; the server certificate is
    valid for each of `hosts` (DNS names or IP addresses). Returns the paths by file name.
    Existing files are replaced only with `force`."""
    folder = Path(folder)
    refuse_existing([folder / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")], force)
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
        "ca.crt": write_new(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, force),
        "ca.key": write_new(folder / "ca.key", _private_pem(ca_key), 0o600, force),
        "server.pem": write_new(
            folder / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), 0o644, force
        ),
        "server.key": write_new(folder / "server.key", _private_pem(server_key), 0o600, force),
    }
    return paths


def check_node_name(name: str) -> None:
    """A SuperNode name names its key files: letters, digits, '-', '_' and '.', never a path."""
    if not NODE_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"--node {name!r}: a SuperNode name may hold letters, digits, '-', '_' and '.' (no path separators, "
            "not '.' or '..'), e.g. clinic-a"
        )


def make_node_keys(folder: Path, name: str, force: bool = False) -> dict[str, Path]:
    """A SuperNode's authentication key pair in OpenSSH format (EC P-384, what Flower expects):
    `NAME.key` stays on the SuperNode (`--auth-supernode-private-key`), `NAME.pub` is registered
    with the SuperLink (`flwr supernode register NAME.pub`). Existing files are replaced only with `force`."""
    check_node_name(name)
    folder = Path(folder)
    refuse_existing([folder / f"{name}.key", folder / f"{name}.pub"], force)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return {
        f"{name}.key": write_new(folder / f"{name}.key", private, 0o600, force),
        f"{name}.pub": write_new(folder / f"{name}.pub", public + f" {name}\n".encode(), 0o644, force),
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
