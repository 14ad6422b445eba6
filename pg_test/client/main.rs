//! Client tests: a real server per scenario, connections as the application's ordinary role
//! `app`, the attacks of ATTACKS.md played from outside the backend.

mod audit;
#[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
mod citus;
mod context;
mod errors;
mod harness;
mod hostile;
mod lifecycle;
#[cfg(feature = "pg15")]
mod node;
#[cfg(feature = "pg15")]
mod node_client;
mod phi;
mod privileged;
mod regress;
mod report;
mod restore;
mod reveals;
mod rls;
mod sealing;
mod sessions;
mod signed;
mod upgrade;
