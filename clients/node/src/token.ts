// Signed mode (docs/context.md): the application tier mints one token per transaction with the
// key the server reads from tenancy.context_key_file; set_org accepts the tenant and actor
// only with it. Byte for byte the server's format:
//
//   token   = "v2." expiry "." nonce "." base64url_nopad(HMAC-SHA256(key, message))
//   message = "pg_tenancy.context.v2\n" org "\n" actor "\n" expiry "\n" nonce
import { createHmac, randomBytes } from "node:crypto";

/** A context key: 32 bytes or more, as a Buffer or as the hex text of the key file. */
export type ContextKey = Buffer | string;

/** The key's bytes: a Buffer as is, a string as the key file's hex (whitespace ignored). */
export function contextKey(key: ContextKey): Buffer {
  const bytes = typeof key === "string" ? Buffer.from(key.replace(/\s+/g, ""), "hex") : key;
  if (typeof key === "string" && !/^([0-9a-fA-F]{2})+$/.test(key.replace(/\s+/g, ""))) {
    throw new TypeError("pg_tenancy: a context key given as text must be hex, as in the key file");
  }
  if (bytes.length < 32) {
    throw new TypeError(`pg_tenancy: a context key needs at least 32 bytes, not ${bytes.length}`);
  }
  return bytes;
}

export interface MintOptions {
  /** Seconds the token stays valid (default 60: it is used once, at the transaction's start). */
  ttlSeconds?: number;
  /** The clock, in Unix seconds (tests). */
  now?: number;
  /** The nonce (tests; by default 16 random bytes, base64url). */
  nonce?: string;
  /**
   * How the server stores the tenant id: "uuid" (lower-case hyphenated), "text" (verbatim), or
   * "auto" (the default: a UUID in any spelling as "uuid", anything else verbatim). With text
   * tenant ids that look like UUIDs, say "text".
   */
  format?: "auto" | "uuid" | "text";
}

/**
 * A context token for `tenancy.set_org(org, actor, token)` in signed mode. `org` must be the
 * tenant id as set_org stores it: a UUID in lower case, or a text id verbatim; `actor` the
 * actor id or null. Tokens are single-use: mint one per transaction.
 */
export function mintContextToken(
  key: ContextKey,
  org: string,
  actor: string | null = null,
  options: MintOptions = {},
): string {
  const bytes = contextKey(key);
  const now = options.now ?? Math.floor(Date.now() / 1000);
  const expiry = now + (options.ttlSeconds ?? 60);
  const nonce = options.nonce ?? randomBytes(16).toString("base64url");
  if (!/^[A-Za-z0-9_-]{16,64}$/.test(nonce)) {
    throw new TypeError("pg_tenancy: a nonce is 16 to 64 base64url characters");
  }
  const canonical = options.format === "text" ? org : canonicalOrg(org);
  if (options.format === "uuid" && !UUID.test(org)) {
    throw new TypeError("pg_tenancy: the tenant id is not a UUID");
  }
  const message = `pg_tenancy.context.v2\n${canonical}\n${actor ?? ""}\n${expiry}\n${nonce}`;
  const mac = createHmac("sha256", bytes).update(message, "utf8").digest("base64url");
  return `v2.${expiry}.${nonce}.${mac}`;
}

const UUID = /^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$/;

/** The tenant id as set_org stores it: a UUID hyphenated in lower case; any other id as is. */
export function canonicalOrg(org: string): string {
  if (UUID.test(org)) {
    const hex = org.replace(/-/g, "").toLowerCase();
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }
  return org;
}
