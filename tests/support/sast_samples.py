"""Known-vulnerable (and known-safe) snippets per language for the SAST tests."""

PYTHON = '''import hashlib
import os
import pickle
import subprocess

import requests
import yaml

DB_PASSWORD = "hunter2hunter2"


def run(cmd, cur, name, blob, doc):
    subprocess.run(cmd, shell=True)
    os.system("ls " + cmd)
    cur.execute("SELECT * FROM users WHERE name = '%s'" % name)
    cur.execute(f"SELECT * FROM users WHERE name = '{name}'")
    obj = pickle.loads(blob)
    data = yaml.load(doc)
    safe = yaml.safe_load(doc)
    digest = hashlib.md5(blob).hexdigest()
    ok = hashlib.md5(blob, usedforsecurity=False)
    requests.get("https://example.com", verify=False, timeout=5)
    eval(name)
    return obj, data, safe, digest, ok
'''

PYTHON_SAFE = '''import json
import subprocess


def run(args, cur, name, doc):
    subprocess.run(["ls", "-l", args], check=True)
    cur.execute("SELECT * FROM users WHERE name = %s", (name,))
    return json.loads(doc)
'''

JAVASCRIPT = '''const cp = require('child_process');
const crypto = require('crypto');
const serialize = require('node-serialize');

const apiKey = "sk_live_abcdef123456";

function handler(req, db) {
  cp.exec("ls " + req.query.dir);
  cp.exec("ls -la");
  db.query("SELECT * FROM users WHERE id = " + req.query.id);
  const h = crypto.createHash('md5').update(req.body).digest('hex');
  const c = crypto.createCipheriv('des-ede3-cbc', key, iv);
  const o = serialize.unserialize(req.body);
  eval(req.query.code);
  return [h, c, o];
}
module.exports = handler;
'''

TYPESCRIPT = '''import { exec } from 'child_process';
import * as crypto from 'crypto';

export function run(user: string, db: any): void {
  exec(`grep ${user} /etc/passwd`);
  db.query(`SELECT * FROM t WHERE u = '${user}'`);
  crypto.createHash('sha1');
  crypto.createHash('sha256');
}
'''

GO = '''package main

import (
\t"crypto/des"
\t"crypto/md5"
\t"crypto/tls"
\t"database/sql"
\t"fmt"
\t"os/exec"
)

const dbPassword = "s3cr3tpassw0rd"

func handle(db *sql.DB, name string, key []byte) {
\texec.Command("sh", "-c", "echo "+name).Run()
\tdb.Query(fmt.Sprintf("SELECT * FROM users WHERE name = '%s'", name))
\tdb.Query("SELECT * FROM users WHERE name = $1", name)
\tmd5.Sum([]byte(name))
\tdes.NewCipher(key)
\t_ = &tls.Config{InsecureSkipVerify: true}
}
'''

JAVA = '''import java.io.ObjectInputStream;
import java.io.InputStream;
import java.security.MessageDigest;
import java.sql.Statement;
import javax.crypto.Cipher;

public class Main {
    private static final String password = "correcthorsebattery";

    public Object handle(Statement st, String name, InputStream in) throws Exception {
        Runtime.getRuntime().exec("ping " + name);
        st.executeQuery("SELECT * FROM users WHERE name = '" + name + "'");
        MessageDigest.getInstance("MD5");
        MessageDigest.getInstance("SHA-256");
        Cipher.getInstance("DES/CBC/PKCS5Padding");
        ObjectInputStream ois = new ObjectInputStream(in);
        return ois.readObject();
    }
}
'''

RUBY = '''def run(cmd)
  system("ls #{cmd}")
end
'''

REPO = {
    "app/vuln.py": PYTHON,
    "app/safe.py": PYTHON_SAFE,
    "web/app.js": JAVASCRIPT,
    "web/server.ts": TYPESCRIPT,
    "svc/main.go": GO,
    "svc/Main.java": JAVA,
    "scripts/run.rb": RUBY,
}

BANDIT = {
    ("bandit.B403", "app/vuln.py", 3),
    ("bandit.B404", "app/vuln.py", 4),
    ("bandit.B105", "app/vuln.py", 9),
    ("bandit.B602", "app/vuln.py", 13),
    ("bandit.B605", "app/vuln.py", 14),
    ("bandit.B608", "app/vuln.py", 15),
    ("bandit.B608", "app/vuln.py", 16),
    ("bandit.B301", "app/vuln.py", 17),
    ("bandit.B506", "app/vuln.py", 18),
    ("bandit.B324", "app/vuln.py", 20),
    ("bandit.B501", "app/vuln.py", 22),
    ("bandit.B307", "app/vuln.py", 23),
    ("bandit.B404", "app/safe.py", 2),
    ("bandit.B603", "app/safe.py", 6),
    ("bandit.B607", "app/safe.py", 6),
}

SEMGREP = {
    ("semgrep.python-hardcoded-credential", "app/vuln.py", 9),
    ("semgrep.python-subprocess-shell-true", "app/vuln.py", 13),
    ("semgrep.python-os-system", "app/vuln.py", 14),
    ("semgrep.python-sql-string-building", "app/vuln.py", 15),
    ("semgrep.python-sql-string-building", "app/vuln.py", 16),
    ("semgrep.python-pickle-load", "app/vuln.py", 17),
    ("semgrep.python-yaml-unsafe-load", "app/vuln.py", 18),
    ("semgrep.python-weak-hash", "app/vuln.py", 20),
    ("semgrep.python-tls-verify-disabled", "app/vuln.py", 22),
    ("semgrep.python-eval-dynamic", "app/vuln.py", 23),
    ("semgrep.js-hardcoded-credential", "web/app.js", 5),
    ("semgrep.js-child-process-exec", "web/app.js", 8),
    ("semgrep.js-sql-string-building", "web/app.js", 10),
    ("semgrep.js-weak-hash", "web/app.js", 11),
    ("semgrep.js-weak-cipher", "web/app.js", 12),
    ("semgrep.js-unsafe-deserialization", "web/app.js", 13),
    ("semgrep.js-eval-dynamic", "web/app.js", 14),
    ("semgrep.js-child-process-exec", "web/server.ts", 5),
    ("semgrep.js-sql-string-building", "web/server.ts", 6),
    ("semgrep.js-weak-hash", "web/server.ts", 7),
    ("semgrep.go-hardcoded-credential", "svc/main.go", 12),
    ("semgrep.go-exec-shell", "svc/main.go", 15),
    ("semgrep.go-sql-string-building", "svc/main.go", 16),
    ("semgrep.go-weak-hash", "svc/main.go", 18),
    ("semgrep.go-weak-cipher", "svc/main.go", 19),
    ("semgrep.go-tls-insecure-skip-verify", "svc/main.go", 20),
    ("semgrep.java-hardcoded-credential", "svc/Main.java", 8),
    ("semgrep.java-runtime-exec", "svc/Main.java", 11),
    ("semgrep.java-sql-string-building", "svc/Main.java", 12),
    ("semgrep.java-weak-hash", "svc/Main.java", 13),
    ("semgrep.java-weak-cipher", "svc/Main.java", 15),
    ("semgrep.java-object-deserialization", "svc/Main.java", 17),
}
