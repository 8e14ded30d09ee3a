//! PostgreSQL over TLS: a throwaway cluster (`initdb`, `pg_ctl` from the
//! Debian packages) with `ssl = on` and a certificate made here, which refuses
//! any connection without TLS. Each `sslmode` is tried against it, and a
//! certificate signed by another CA is a clear exit 2.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// A PostgreSQL cluster of its own on a free port, stopped on drop.
struct TlsCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    ca_file: PathBuf,
}

impl TlsCluster {
    /// `None` (test skipped) without the server binaries, except under CI.
    fn start() -> Option<TlsCluster> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.flatten().map(|v| v.path().join("bin")).find(|b| b.join("initdb").is_file()));
        let Some(bin) = bin else {
            assert!(std::env::var("CI").is_err(), "PostgreSQL server binaries (initdb, pg_ctl) are required under CI");
            eprintln!("SKIPPED: no initdb under /usr/lib/postgresql (Debian's postgresql package)");
            return None;
        };
        let dir = std::env::temp_dir().join(unique("pg-tls"));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, key, cert) = crate::avro::test_pki();
        std::fs::write(dir.join("server.crt"), cert.to_pem().unwrap()).unwrap();
        std::fs::write(dir.join("server.key"), key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.to_pem().unwrap()).unwrap();
        // initdb refuses to run as root: the cluster belongs to the postgres user.
        let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
        let run = |program: &Path, args: &[&str]| {
            let status = if as_root {
                Command::new("runuser").args(["-u", "postgres", "--"]).arg(program).args(args).status()
            } else {
                Command::new(program).args(args).status()
            };
            assert!(status.unwrap().success(), "{} {args:?} failed", program.display());
        };
        if as_root {
            let ok = Command::new("chown").args(["-R", "postgres:", dir.to_str().unwrap()]).status().unwrap();
            assert!(ok.success());
        }
        let key_file = dir.join("server.key");
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        run(&bin.join("initdb"), &["-D", data.to_str().unwrap(), "-U", "postgres", "--auth=trust", "-N"]);
        let port = free_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\nssl = on\n\
             ssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\nfsync = off\n",
            dir = dir.display()
        );
        let mut conf_file = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(&mut conf_file, conf.as_bytes()).unwrap();
        // TLS or nothing: a plaintext connection is refused by the server.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let log = dir.join("server.log");
        run(&bin.join("pg_ctl"), &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "start"]);
        Some(TlsCluster { dir, bin, port, ca_file })
    }

    fn url(&self, query: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres{query}", self.port)
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let pg_ctl = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = Command::new("runuser").args(["-u", "postgres", "--"]).arg(&pg_ctl).args(args).status();
        let _ = Command::new(&pg_ctl).args(args).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn uses_tls(url: &str) -> Result<bool, String> {
    let client = copilot_ingest::backend::postgres::connect(url).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_honour_sslmode_and_sslrootcert() {
    let Some(cluster) = TlsCluster::start() else { return };
    let ca = cluster.ca_file.display().to_string();

    // prefer (the default) and require negotiate TLS; verify-ca and
    // verify-full check the certificate against sslrootcert.
    for query in [
        String::new(),
        "?sslmode=prefer".into(),
        "?sslmode=require".into(),
        format!("?sslmode=verify-ca&sslrootcert={ca}"),
        format!("?sslmode=verify-full&sslrootcert={ca}"),
    ] {
        assert_eq!(uses_tls(&cluster.url(&query)).await, Ok(true), "{query}");
    }
    // disable: the server refuses plaintext, so this fails (and proves the others used TLS).
    assert!(uses_tls(&cluster.url("?sslmode=disable")).await.is_err());
    // verify-full checks the host name: the certificate is for 127.0.0.1, not localhost.
    let by_name =
        format!("postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}", cluster.port);
    let refused = uses_tls(&by_name).await.unwrap_err();
    assert!(refused.contains("TLS"), "{refused}");

    // The binary: migrate over verified TLS works; a certificate from another CA exits 2.
    let out = binary()
        .arg("migrate")
        .env("COPILOT_INGEST__SINK__URL", cluster.url(&format!("?sslmode=verify-full&sslrootcert={ca}")))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let (other_ca, _, _) = crate::avro::test_pki();
    let other = cluster.dir.join("other-ca.pem");
    std::fs::write(&other, other_ca.to_pem().unwrap()).unwrap();
    let out = binary()
        .arg("migrate")
        .env("COPILOT_INGEST__SINK__URL", cluster.url(&format!("?sslmode=verify-ca&sslrootcert={}", other.display())))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "a CA that did not sign the server's certificate: {stderr}");
    assert!(stderr.contains("certificate verify failed"), "{stderr}");
}
