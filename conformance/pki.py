"""Test PKI built with `cryptography` (independent of eastguard's own dev CA).

Mints SPIFFE X509-SVIDs, and the broken ones the verifier must refuse: expired, CA-as-leaf,
two URI SANs, another trust domain.
"""

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CA:
    def __init__(self, trust_domain: str):
        self.trust_domain = trust_domain
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"test CA {trust_domain}")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def mint(self, spiffe_ids, *, ca=False, not_before=None, not_after=None, dns=(), ips=()):
        """An SVID (cert PEM, key PEM). `spiffe_ids` may name several URIs (a broken SVID); `dns`
        and `ips` add DNS names and IP addresses (for clients that check a host name, like
        gRPC's, or plain HTTPS servers)."""
        import ipaddress

        if isinstance(spiffe_ids, str):
            spiffe_ids = [spiffe_ids]
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - datetime.timedelta(minutes=5))
            .not_valid_after(not_after or NOW + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(u) for u in spiffe_ids] + [x509.DNSName(d) for d in dns]
                    + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
                ),
                critical=False,
            )
        )
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            b = (
                b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
                )
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False,
                )
            )
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def write_svid(self, directory: Path, name: str, spiffe_ids, **kw):
        cert, key = self.mint(spiffe_ids, **kw)
        c, k = directory / f"{name}.cert.pem", directory / f"{name}.key.pem"
        c.write_bytes(cert)
        k.write_bytes(key)
        return c, k


def serial_of(cert_pem: bytes) -> int:
    return x509.load_pem_x509_certificate(cert_pem).serial_number
