// A real OpenID provider on loopback for the tests: npm's `oidc-provider` (package.json pins
// it), served over HTTPS with the certificate the Python harness made (tests/oidc_provider.py).
//
//   node tests/oidc_provider.mjs CONFIG.json
//
// CONFIG: {"cert": PEM path, "key": PEM path, "clients": [oidc-provider client metadata...],
//          "id_token_ttl": seconds, "refresh_token_ttl": seconds}
// Prints one JSON line {"issuer": "https://127.0.0.1:PORT", "port": PORT} on stdout once it
// listens (port chosen by the kernel), then one JSON line per request to stderr for the tests
// ({"method", "path"}; never a body: no token is ever logged). Stops on SIGTERM/SIGINT.
//
// Features: the device authorization grant (RFC 8628) with the provider's own pages, its
// development interactions (any login/password signs in; the account id is the login) and a
// throwaway RS256 signing key made here at start-up. An account's claims: sub = the login,
// email = login@example.test.
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const jwk = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
const signingKey = { ...jwk, kid: randomUUID(), alg: 'RS256', use: 'sig' };

let handler; // set once the port (and so the issuer) is known
const server = https.createServer(
  { cert: readFileSync(config.cert), key: readFileSync(config.key) },
  (req, res) => {
    process.stderr.write(`${JSON.stringify({ method: req.method, path: req.url.split('?')[0] })}\n`);
    handler(req, res);
  },
);

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `https://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks: { keys: [signingKey] },
    features: {
      deviceFlow: { enabled: true },
      devInteractions: { enabled: true },
      revocation: { enabled: true },
    },
    scopes: ['openid', 'offline_access', 'email'],
    claims: { openid: ['sub'], email: ['email', 'email_verified'] },
    async findAccount(_ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, email: `${id}@example.test`, email_verified: true };
        },
      };
    },
    conformIdTokenClaims: false, // put the scope's claims (email) in the ID token itself
    cookies: { keys: [randomUUID()] },
    ttl: {
      IdToken: config.id_token_ttl ?? 3600,
      AccessToken: config.id_token_ttl ?? 3600,
      RefreshToken: config.refresh_token_ttl ?? 86400,
      DeviceCode: 600,
      Grant: 86400,
      Interaction: 600,
      Session: 86400,
    },
  });
  handler = provider.callback();
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.closeAllConnections();
    server.close(() => process.exit(0));
  });
}
