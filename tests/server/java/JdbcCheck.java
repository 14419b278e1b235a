import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.Statement;
import java.util.Properties;

/**
 * The DatabaseMetaData path that Metabase, Tableau and DBeaver take, against a florql server.
 * Usage: java -cp postgresql.jar:. JdbcCheck URL USER PASSWORD TABLE
 * Prints one line per fact ("TABLE ...", "COLUMN ...", "ROWS ...") for the Python test to check.
 */
public class JdbcCheck {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        String table = args[3];
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            DatabaseMetaData meta = conn.getMetaData();
            System.out.println("PRODUCT " + meta.getDatabaseProductName() + " " + meta.getDatabaseProductVersion());
            try (ResultSet rs = meta.getSchemas()) {
                while (rs.next()) System.out.println("SCHEMA " + rs.getString("TABLE_SCHEM"));
            }
            try (ResultSet rs = meta.getTables(null, null, "%", new String[] {"TABLE", "VIEW"})) {
                while (rs.next()) {
                    System.out.println("TABLE " + rs.getString("TABLE_SCHEM") + " " + rs.getString("TABLE_NAME") + " " + rs.getString("TABLE_TYPE"));
                }
            }
            try (ResultSet rs = meta.getColumns(null, "public", table, "%")) {
                while (rs.next()) {
                    System.out.println("COLUMN " + rs.getString("TABLE_NAME") + " " + rs.getString("COLUMN_NAME") + " " + rs.getString("TYPE_NAME") + " " + rs.getInt("ORDINAL_POSITION"));
                }
            }
            try (ResultSet rs = meta.getPrimaryKeys(null, "public", table)) {
                while (rs.next()) System.out.println("PK " + rs.getString("COLUMN_NAME"));
            }
            try (ResultSet rs = meta.getImportedKeys(null, "public", table)) {
                while (rs.next()) System.out.println("FK " + rs.getString("FKCOLUMN_NAME"));
            }
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT * FROM " + table)) {
                ResultSetMetaData md = rs.getMetaData();
                StringBuilder types = new StringBuilder("RESULT_TYPES");
                for (int i = 1; i <= md.getColumnCount(); i++) types.append(" ").append(md.getColumnName(i)).append(":").append(md.getColumnTypeName(i));
                System.out.println(types);
                int n = 0;
                while (rs.next()) n++;
                System.out.println("ROWS " + n);
            }
            for (int attempt = 0; attempt < 6; attempt++) {  // reused: becomes a named server-side statement
                try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM " + table + " WHERE 1 = ?")) {
                    ps.setInt(1, 1);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        System.out.println("COUNT " + rs.getLong(1));
                    }
                }
            }
            conn.setAutoCommit(false);  // fetch size only streams inside a transaction
            try (Statement st = conn.createStatement()) {
                st.setFetchSize(2);
                try (ResultSet rs = st.executeQuery("SELECT * FROM \"public\".\"" + table + "\" LIMIT 1048575")) {
                    int n = 0;
                    while (rs.next()) n++;
                    System.out.println("FETCHED " + n);
                }
            }
            conn.rollback();
            System.out.println("OK");
        }
    }
}
