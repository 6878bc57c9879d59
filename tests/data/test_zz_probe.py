import os, subprocess, time
def test_z_probe():
    time.sleep(3)
    out = subprocess.run(["ps", "-o", "pid,ppid,pcpu,etime,cmd", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    print(out)
