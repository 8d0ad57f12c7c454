//! Missing CUDA pieces are values: constructing the backend never panics, and without a driver it
//! returns `Error::Unavailable` naming what is missing. Runs everywhere.

use layernorm_core::Error;
use layernorm_cuda::CudaBackend;

#[test]
fn construction_reports_what_is_missing() {
    let driver = layernorm_cuda::driver_available();
    let nvrtc = layernorm_cuda::nvrtc_available();
    let result = std::panic::catch_unwind(CudaBackend::new).expect("CudaBackend::new panicked");
    match (&driver, &nvrtc, result) {
        (Err(_), _, Err(Error::Unavailable { backend, reason })) => {
            assert_eq!(backend, "cuda");
            assert!(reason.contains("libcuda"), "reason should name the driver: {reason}");
            println!("no driver, as expected here: {reason}");
        }
        (Ok(()), Err(_), Err(Error::Unavailable { reason, .. })) => {
            assert!(reason.contains("NVRTC"), "reason should name NVRTC: {reason}");
        }
        (Err(_), _, other) => panic!("without a driver, expected Unavailable, got {other:?}"),
        (Ok(()), Err(_), other) => panic!("without NVRTC, expected Unavailable, got {other:?}"),
        // Driver and NVRTC present: a device, or a clear error (no device, init failure).
        (Ok(()), Ok(()), Ok(b)) => println!("CUDA available: {b:?}"),
        (Ok(()), Ok(()), Err(e)) => {
            assert!(matches!(e.class(), "unavailable" | "device"), "{e:?}");
            println!("CUDA libraries present but unusable: {e}");
        }
    }
}

#[test]
fn a_missing_device_ordinal_is_unavailable() {
    let result = std::panic::catch_unwind(|| CudaBackend::with_device(usize::MAX))
        .expect("with_device panicked");
    assert_eq!(result.unwrap_err().class(), "unavailable");
}

#[test]
fn name_is_cuda() {
    assert_eq!(layernorm_cuda::NAME, "cuda");
    assert_eq!(CudaBackend::NAME, "cuda");
}
