// Errors from pg_tenancy, typed by SQLSTATE (docs/reference.md), found under Drizzle's
// wrapper (DrizzleQueryError keeps pg's error in `cause`). Their messages are the server's
// words only: never the query's text or its bind parameters (Drizzle's own message prints
// every parameter: PHI plaintext and signed tokens would land in application logs).

/** What the server said, without the query or its parameters. */
export interface ServerError {
  code: string;
  message: string;
  detail?: string;
  hint?: string;
}

/** An error pg_tenancy (or PostgreSQL, on its behalf) raised. */
export class TenancyError extends Error {
  readonly code: string;
  readonly detail?: string;
  readonly hint?: string;
  constructor(e: ServerError) {
    super(e.message);
    this.name = new.target.name;
    this.code = e.code;
    this.detail = e.detail;
    this.hint = e.hint;
  }
  toJSON(): ServerError & { name: string } {
    return { name: this.name, code: this.code, message: this.message, detail: this.detail, hint: this.hint };
  }
}

/** 42501: not allowed (no tenant context, another tenant's row, a refused change). */
export class AccessDeniedError extends TenancyError {}
/** 42501 "no tenant context is set": the statement ran outside withTenant. */
export class NoTenantError extends AccessDeniedError {}
/** 28000: a context token is missing, invalid, expired or already used; a PHI value did not authenticate. */
export class AuthenticationError extends TenancyError {}
/** 22023, 22004: a malformed or NULL tenant id, actor or label. */
export class InvalidValueError extends TenancyError {}
/** 55000: the server is not set up for this (no key ring, not preloaded, ...). */
export class NotConfiguredError extends TenancyError {}
/** 53400: too many unexpired tokens remembered. */
export class CapacityError extends TenancyError {}

const BY_CODE: Record<string, new (e: ServerError) => TenancyError> = {
  "42501": AccessDeniedError,
  "28000": AuthenticationError,
  "22023": InvalidValueError,
  "22004": InvalidValueError,
  "55000": NotConfiguredError,
  "53400": CapacityError,
};

function serverError(err: unknown): ServerError | undefined {
  // pg's DatabaseError, possibly wrapped (Drizzle: `cause`), at most a few levels down.
  let e: unknown = err;
  for (let depth = 0; depth < 5 && e && typeof e === "object"; depth++) {
    const o = e as { code?: unknown; message?: unknown; detail?: unknown; hint?: unknown; severity?: unknown; cause?: unknown };
    if (typeof o.code === "string" && /^[0-9A-Z]{5}$/.test(o.code) && typeof o.severity === "string") {
      return {
        code: o.code,
        message: String(o.message ?? ""),
        detail: typeof o.detail === "string" ? o.detail : undefined,
        hint: typeof o.hint === "string" ? o.hint : undefined,
      };
    }
    e = o.cause;
  }
  return undefined;
}

/**
 * The typed error for `err` (a pg error, or Drizzle's wrapper of one): a TenancyError
 * subclass by SQLSTATE, or a plain TenancyError for any other server error. `undefined` when
 * `err` did not come from the server.
 */
export function tenancyError(err: unknown): TenancyError | undefined {
  if (err instanceof TenancyError) return err;
  const e = serverError(err);
  if (!e) return undefined;
  if (e.code === "42501" && e.message === "no tenant context is set") return new NoTenantError(e);
  const Cls = BY_CODE[e.code];
  // PostgreSQL's own DETAIL can quote row values (a unique key's "Key (...)=(...)"): kept
  // for pg_tenancy's SQLSTATEs only.
  return Cls ? new Cls(e) : new TenancyError({ code: e.code, message: e.message, hint: e.hint });
}

/** `tenancyError(err)`, or `err` itself when it did not come from the server. */
export function toTenancyError(err: unknown): unknown {
  return tenancyError(err) ?? err;
}
