# Shared by both packages' postinst: the system user `causeway` that runs the services.
if ! getent passwd causeway >/dev/null; then
    adduser --system --group --home /var/lib/causeway --no-create-home \
        --gecos "Causeway service mesh" causeway >/dev/null
fi
