//! Runs a fake Consul and a fake Eureka as a process, so tests can start them inside a
//! network namespace (each binds that namespace's 127.0.0.1).
//!
//! Usage: `fake-registries OUT_FILE [consul:ID,NAME,ADDR,PORT[,TAG...]]... [eureka:APP,ID,ADDR,PORT,VIP]...`
//! Writes `{"consul": URL, "eureka": URL}` to OUT_FILE once both listen, then serves
//! until killed.

use causeway_fakes::{ConsulRegistration, EurekaInstance, FakeConsul, FakeEureka};

const USAGE: &str = "usage: fake-registries OUT_FILE [consul:ID,NAME,ADDR,PORT[,TAG...]]... [eureka:APP,ID,ADDR,PORT,VIP]...";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-registries: {e}\n{USAGE}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        return Err("no output file".into());
    };
    let consul = FakeConsul::start_empty()
        .await
        .map_err(|e| format!("cannot start the fake Consul: {e}"))?;
    let eureka = FakeEureka::start_empty()
        .await
        .map_err(|e| format!("cannot start the fake Eureka: {e}"))?;
    for a in args {
        if let Some(spec) = a.strip_prefix("consul:") {
            let f: Vec<&str> = spec.split(',').collect();
            if f.len() < 4 {
                return Err(format!("{a}: need ID,NAME,ADDR,PORT"));
            }
            let port = f[3].parse().map_err(|_| format!("{a}: bad port"))?;
            let mut reg = ConsulRegistration::new(f[0], f[1], f[2], port);
            reg.tags = f[4..].iter().map(|t| (*t).to_owned()).collect();
            consul.register(&reg);
        } else if let Some(spec) = a.strip_prefix("eureka:") {
            let f: Vec<&str> = spec.split(',').collect();
            if f.len() != 5 {
                return Err(format!("{a}: need APP,ID,ADDR,PORT,VIP"));
            }
            let port = f[3].parse().map_err(|_| format!("{a}: bad port"))?;
            let mut inst = EurekaInstance::new(f[0], f[1], f[2], port);
            inst.vip = f[4].to_owned();
            eureka.register(&inst);
        } else {
            return Err(format!("{a}: expected consul:... or eureka:..."));
        }
    }
    let json = format!(
        "{{\"consul\": \"{}\", \"eureka\": \"{}\"}}\n",
        consul.url(),
        eureka.url()
    );
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &out))
        .map_err(|e| format!("cannot write {out}: {e}"))?;
    std::future::pending::<()>().await;
    Ok(())
}
