export { mintContextToken, contextKey, canonicalOrg, type ContextKey, type MintOptions } from "./token.js";
export { withTenant, type TenantOptions } from "./tenant.js";
export {
  TenancyError,
  AccessDeniedError,
  NoTenantError,
  AuthenticationError,
  InvalidValueError,
  NotConfiguredError,
  CapacityError,
  tenancyError,
  toTenancyError,
  type ServerError,
} from "./errors.js";
