#!/bin/sh
# Regenerates rsa_schemes.json: one RSA-2048 public key and signatures over MSG for every
# RSA scheme securesystemslib signs with (PKCS#1 v1.5 and PSS with salt = digest length,
# as securesystemslib's CryptoSigner does), made with the openssl CLI.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
MSG='outpost rsa fixture'
printf '%s' "$MSG" > "$tmp/msg"
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/k.pem" 2>/dev/null
openssl pkey -in "$tmp/k.pem" -pubout -out "$tmp/pub.pem"
{
  printf '{\n  "message": "%s",\n' "$MSG"
  printf '  "public": "%s",\n' "$(awk '{printf "%s\\n", $0}' "$tmp/pub.pem")"
  printf '  "signatures": {\n'
  first=1
  for h in sha224 sha256 sha384 sha512; do
    openssl dgst -$h -sign "$tmp/k.pem" -out "$tmp/p1" "$tmp/msg"
    openssl dgst -$h -sign "$tmp/k.pem" -sigopt rsa_padding_mode:pss \
      -sigopt rsa_pss_saltlen:digest -out "$tmp/pss" "$tmp/msg"
    [ $first = 1 ] || printf ',\n'
    first=0
    printf '    "rsa-pkcs1v15-%s": "%s",\n' $h "$(xxd -p -c 100000 "$tmp/p1")"
    printf '    "rsassa-pss-%s": "%s"' $h "$(xxd -p -c 100000 "$tmp/pss")"
  done
  printf '\n  }\n}\n'
} > rsa_schemes.json
