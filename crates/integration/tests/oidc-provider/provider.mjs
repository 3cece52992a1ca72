// A real OpenID Connect provider for the gateway's OIDC tests: panva's oidc-provider, serving
// HTTPS on 127.0.0.1 and issuing JWT access tokens with the client-credentials grant.
//
// Environment:
//   OIDC_PORT      the port (0: any; the line "listening <port>" says which)
//   OIDC_CERT, OIDC_KEY   the server certificate and key (PEM)
//   OIDC_KEYS_DIR  where signing keys are kept (made on first use, as private JWKs)
//   OIDC_KEYS      the signing keys, e.g. "ec-1,rsa-2": the first signs, all are published.
//                  "ec-*" is P-256 (ES256), "rsa-*" RSA 2048 (RS256), "ps-*" RSA 2048 (PS256).
//   OIDC_AUDIENCE, OIDC_OTHER_AUDIENCE   the resource indicators tokens may be issued for
//
// Clients (client_secret_post, secret "secret-<id>"): device-001 (tenant-a, role
// Portcullis.Device), other-tenant (tenant-b), no-role (tenant-a, no roles), short-lived
// (tenant-a, the role, tokens valid 1 s).
import { createServer } from 'node:https';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as crypto from 'node:crypto';

import Provider, { errors } from 'oidc-provider';

const env = (name) => {
  const value = process.env[name];
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const algOf = (name) => (name.startsWith('ec-') ? 'ES256' : name.startsWith('ps-') ? 'PS256' : 'RS256');

function signingKey(name) {
  const file = join(env('OIDC_KEYS_DIR'), `${name}.jwk.json`);
  if (!existsSync(file)) {
    const { privateKey } = name.startsWith('ec-')
      ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' })
      : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    const jwk = { ...privateKey.export({ format: 'jwk' }), kid: name, alg: algOf(name), use: 'sig' };
    writeFileSync(file, JSON.stringify(jwk));
  }
  return JSON.parse(readFileSync(file, 'utf8'));
}

const names = env('OIDC_KEYS').split(',');
const keys = names.map(signingKey);
const audiences = [env('OIDC_AUDIENCE'), env('OIDC_OTHER_AUDIENCE')];

const extra = {
  'device-001': { tid: 'tenant-a', roles: ['Portcullis.Device'] },
  'other-tenant': { tid: 'tenant-b', roles: ['Portcullis.Device'] },
  'no-role': { tid: 'tenant-a' },
  'short-lived': { tid: 'tenant-a', roles: ['Portcullis.Device'] },
};

const configuration = {
  clients: Object.keys(extra).map((id) => ({
    client_id: id,
    client_secret: `secret-${id}`,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
    id_token_signed_response_alg: algOf(names[0]),
  })),
  jwks: { keys },
  cookies: { keys: ['portcullis-test-only'] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audiences[0],
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => {
        if (!audiences.includes(resource)) throw new errors.InvalidTarget();
        return {
          scope: 'device',
          audience: resource,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: algOf(names[0]), kid: names[0] } },
        };
      },
    },
  },
  ttl: {
    ClientCredentials: (ctx, token, client) => (client.clientId === 'short-lived' ? 1 : 600),
  },
  extraTokenClaims: async (ctx, token) => extra[token.clientId],
};

let handler = (req, res) => {
  res.statusCode = 503;
  res.end();
};
const server = createServer(
  { cert: readFileSync(env('OIDC_CERT')), key: readFileSync(env('OIDC_KEY')) },
  (req, res) => handler(req, res),
);
server.listen(Number(process.env.OIDC_PORT || 0), '127.0.0.1', () => {
  const { port } = server.address();
  const provider = new Provider(`https://127.0.0.1:${port}`, configuration);
  handler = provider.callback();
  console.log(`listening ${port} signing with ${names[0]}`);
});
