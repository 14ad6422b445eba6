//! A jsonb datum as the exact text `jsonb_out` writes (keys in jsonb's order, numbers with
//! every digit). pgrx's `JsonB` goes through serde_json's f64 numbers and panics on values
//! nested deeper than serde's limit, so the functions that take jsonb read the raw datum and
//! come here. A leaf.

use pgrx::prelude::*;

/// The text form of `value`, a non-NULL jsonb datum.
pub(crate) fn jsonb_text(value: pg_sys::Datum) -> Vec<u8> {
    // SAFETY: `value` is a non-NULL jsonb datum (the callers' SQL signatures say jsonb);
    // jsonb_out returns a palloc'd C string, copied before it goes.
    unsafe {
        let out = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(value)])
            .expect("jsonb_out returns a string");
        std::ffi::CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>())
            .to_bytes()
            .to_vec()
    }
}
